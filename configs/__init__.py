"""The shipped config presets (YAML), installed as the package ``megavla.configs``: see megavla/config/shipped.py."""
