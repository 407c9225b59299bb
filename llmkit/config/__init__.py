"""The settings of a run: the schema (`schema`), its checks (`check`), and where values come
from (`recipes`: recipe files, CLI options, `-s` overrides)."""
