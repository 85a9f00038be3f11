"""Bundled configs (YAML), installed as `querydet_cli.configs`; `querydet configs` lists them."""
