"""Experiments: jitted pipelines run from YAML configs (``effjax-run configs/NAME.yaml``)."""
