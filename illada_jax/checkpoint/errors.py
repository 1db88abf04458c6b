"""The one error type of checkpoint conversion."""


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file and tensor."""
