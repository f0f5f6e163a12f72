"""Image data sets: class folders (folders), safe uploads (zips), decoding (images), transforms and
splits. DataError is shared by all of them."""


class DataError(ValueError):
    """Input the user can fix; the message says how."""
