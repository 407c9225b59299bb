"""The one error type users see: its message is printed as a single line by the CLI."""


class LlmkitError(Exception):
    """A mistake the user can fix; the message says what to change."""


class ConfigError(LlmkitError):
    """A recipe, option or override that does not fit the config schema."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config: " + "; ".join(problems))
