"""MegaVLA: vision-language-action training with human video as another embodiment."""
__version__ = "0.1.0"


def load_policy(path, **kwargs):
    """A trained policy in one line: ``megavla.load_policy("runs/mine/export").infer(obs)["actions"]``.

    ``path``: an export dir (``megavla export``), a checkpoint dir or a run dir. Keyword arguments
    (``device``, ``flow_steps``, ``subtask``, ``schema``, ``seed``) and the observation keys are
    described in megavla/serving/policy.py and megavla/serving/schema.py. Imported lazily so that
    ``import megavla`` stays free of torch.
    """
    from megavla.serving.policy import load_policy as _load_policy
    return _load_policy(path, **kwargs)
