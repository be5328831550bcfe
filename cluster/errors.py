"""User-facing errors of the cluster layer. Each carries one line that names what is wrong."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


class TopologyError(UserError):
    """A topology file or section is missing, malformed or inconsistent."""


class PlacementError(UserError):
    """The cluster cannot host what the plan asks for."""
