"""`flower-supernode` with a heartbeat interval of the operator's choosing.

The SuperLink declares a SuperNode gone (and fails the messages it holds) only after it missed
its heartbeats for 2 x its interval. Flower 1.42 fixes that interval at 30 s in two module
constants that its CLI does not expose, so a device that dies takes a minute to be noticed. The
SuperLink accepts intervals in [10, 1800] s; this entry point sets both constants and then runs
Flower's own `flower-supernode` with the remaining arguments.

    python -m fedlodrop.flower.supernode HEARTBEAT_S [flower-supernode arguments...]
"""

from __future__ import annotations

import sys

HEARTBEAT_RANGE_S = (10.0, 1800.0)  # what Flower's SuperLink accepts (HEARTBEAT_MIN/MAX_INTERVAL)


def set_heartbeat(interval_s: float) -> None:
    """Point Flower's SuperNode at `interval_s`; refuses if Flower moved the constants."""
    import flwr.supercore.heartbeat as sender
    import flwr.supernode.fleet_http_connection as connection

    for module in (sender, connection):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise SystemExit(f"error: this Flower ({module.__name__}) has no HEARTBEAT_DEFAULT_INTERVAL; "
                             "run the SuperNode without --heartbeat-s")
        module.HEARTBEAT_DEFAULT_INTERVAL = interval_s


def main() -> None:
    """`python -m fedlodrop.flower.supernode HEARTBEAT_S ...`: set the interval, then run Flower's own flower-
    supernode with the remaining arguments."""
    interval = float(sys.argv[1])
    set_heartbeat(interval)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *sys.argv[2:]]
    flower_supernode()


if __name__ == "__main__":
    main()
