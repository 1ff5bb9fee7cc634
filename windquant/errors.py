"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class WindquantError(Exception):
    """A problem with the user's input, with the fix in the message.

    ``setting`` names the library setting at fault (e.g. ``"target_bits"``); the CLI adds
    the flag that sets it.
    """

    def __init__(self, message: str, setting: str | None = None):
        super().__init__(message)
        self.setting = setting


def reject_unknown_fields(cls: type, d: dict, what: str) -> None:
    """One-line error naming the keys of ``d`` that are not fields of dataclass ``cls``."""
    from dataclasses import fields

    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise WindquantError(f"unknown {what} fields: {', '.join(sorted(unknown))}")


def non_finite_logits(where: str) -> WindquantError:
    """The one message for nan/inf logits: never report a ``nan`` result instead."""
    return WindquantError(
        f"the model produced non-finite logits ({where}); likely causes: corrupt weights (a damaged checkpoint "
        "loaded without digest verification) or values overflowing the model's dtype (load it in float32)"
    )
