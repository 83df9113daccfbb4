"""The one exception type that means "bad input or usage" (exit code 2 at the CLI)."""


class DSV3Error(Exception):
    """Bad input or usage: the CLI prints the one-line message and exits 2."""


class ValidationError(DSV3Error):
    """A checkpoint failed the validation gate (SPEC sec. 14). ``problems`` holds one line per failure
    (file or tensor, what is wrong, the fix); the message is the first line and how many more there are."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        more = len(self.problems) - 1
        tail = f" (+{more} more; dsv3tools inspect lists them)" if more else ""
        super().__init__(f"{self.problems[0]}{tail}")
