"""The one config system: strict keys, typed values, dotted overrides, YAML inheritance."""
import pytest

from megavla.config import Config, ConfigError, load_config, to_dict, write_yaml


def test_defaults_build_and_round_trip(tmp_path):
    cfg = load_config()
    write_yaml(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["data.sources={robot: /r, human: /h}", "data.mixture.human=0.25",
                             "data.chunk_length=50", "model.chunk_length=50", "data.cameras=[head]"])
    assert cfg.data.sources == {"robot": "/r", "human": "/h"}
    assert cfg.data.mixture == {"human": 0.25}
    assert cfg.data.chunk_length == 50 and cfg.data.cameras == ["head"]


@pytest.mark.parametrize("override, fragment", [
    ("data.chunk_lenght=3", "Did you mean 'chunk_length'"),
    ("nope.x=1", "unknown config key 'nope'"),
    ("data.on_bad_sample=maybe", "choose one of ['skip', 'fail']"),
    ("data.chunk_length=abc", "data.chunk_length: expected an integer"),
    ("data.diversity_fraction=1.5", "must be in [0, 1]"),
    ("data.mixture.human=0.5", "no source named 'human'"),
    ("data.cameras=[head, chest]", "unknown camera 'chest'"),
    ("data.batch_size", "must look like dotted.key=value"),
])
def test_bad_values_name_the_key_and_fix(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_yaml_defaults_inheritance_and_override_order(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  batch_size: 4\n  chunk_length: 7\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\ndata:\n  batch_size: 16\n")
    cfg = load_config(tmp_path / "run.yaml", ["data.chunk_length=9"])
    assert (cfg.data.batch_size, cfg.data.chunk_length) == (16, 9)


def test_missing_or_malformed_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_config_is_a_dataclass_tree():
    assert isinstance(load_config(), Config)


@pytest.mark.parametrize("mixture, expected", [
    ([], {"robot": 0.5, "human": 0.5}),
    (["data.mixture.human=0.25"], {"robot": 0.75, "human": 0.25}),
    (["data.mixture={robot: 1, human: 3}"], {"robot": 0.25, "human": 0.75}),
    (["data.mixture.human=0"], {"robot": 1.0, "human": 0.0}),
])
def test_mixture_weights_resolve_to_fractions(mixture, expected):
    cfg = load_config(None, ["data.sources={robot: /r, human: /h}", *mixture])
    assert cfg.data.resolved_mixture() == pytest.approx(expected)


def test_mixture_that_starves_an_unnamed_source_is_an_error():
    with pytest.raises(ConfigError, match=r"leaves \['robot'\] nothing"):
        load_config(None, ["data.sources={robot: /r, human: /h}", "data.mixture.human=1.0"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    # PyYAML reads `1e-4` as a string; a learning rate written that way must still work.
    cfg = load_config(None, ["train.lr=1e-4"])
    assert cfg.train.lr == pytest.approx(1e-4)
    (tmp_path / "c.yaml").write_text("train:\n  lr: 3e-4\n")
    assert load_config(tmp_path / "c.yaml").train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="expected a number"):
        load_config(None, ["train.lr=fast"])


def test_model_vs_data_sizes_are_checked_at_load_for_a_config_with_shard_sets(tmp_path):
    """load_config refuses a mismatch for every entry point that loads a run config naming shard sets
    (data.sources / val_sources); a tree with none (loaded for its model or launch section) loads."""
    small = ["model.preset=small", "data.image_size=32"]
    for sources in ("data.sources.robot=/r", "data.val_sources.robot=/r"):
        with pytest.raises(ConfigError, match=r"^model.image_size=224 \(preset small\) but data.image_size=32: "
                                              r".*set data.image_size=224 .* or model.image_size=32$"):
            load_config(None, [*small, sources])
    assert load_config(None, small).model.preset == "small"
    # A sweep checks every run later, with all their problems together: it loads without the check.
    assert load_config(None, [*small, "data.sources.robot=/r"], check=False).data.image_size == 32
    write_yaml(load_config(None, ["model.preset=small", "data.image_size=224", "data.sources.robot=/r"]),
               tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml").data.image_size == 224


def test_data_image_size_left_out_follows_the_model():
    assert load_config().data.image_size == 32                                   # tiny's
    assert load_config(None, ["model.preset=small"]).data.image_size == 224
    assert load_config(None, ["model.image_size=64", "data.sources.robot=/r"]).data.image_size == 64
    assert load_config(None, ["data.image_size=48"]).data.image_size == 48      # given: kept
