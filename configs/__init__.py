"""The shipped configs, installed with eecnn as ``early_exit.configs`` (``eecnn-sweep`` reads ``agent.yaml`` from
here in any install); from a checkout, pass them as ``--config configs/<name>.yaml``."""
