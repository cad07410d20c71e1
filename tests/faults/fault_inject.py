"""Test-only fault injection: devices whose step raises, as a ClientApp that fails would.

`FEDLODROP_TEST_RAISE="K"` or `"K@R"` (device K, in round R, 1-based; comma-separated) makes those
devices' `round.client.device_step` and `secure_step` raise `RuntimeError("test fault: device K
raises in round R")`. In this process: `patch(module, spec)` (the tests' monkeypatch). In the
processes a test starts (Flower's SuperNodes and ClientApps): put this folder on PYTHONPATH with
the variable set, and `sitecustomize` patches `fedlodrop.round.client` when it is first imported.
Nothing of this is in fedlodrop itself.
"""

from __future__ import annotations

ENV = "FEDLODROP_TEST_RAISE"


def faults(spec: str) -> list[tuple[int, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        k, _, r = item.partition("@")
        out.append((int(k), int(r) if r else None))
    return out


def _raising(fn, spec: str):
    chosen = faults(spec)

    def step(fm, task, *args, **kwargs):
        for k, r in chosen:
            if task.device == k and (r is None or r == task.round + 1):
                raise RuntimeError(f"test fault: device {k} raises in round {task.round + 1}")
        return fn(fm, task, *args, **kwargs)

    return step


def patch(module, spec: str, setattr_=setattr) -> None:
    """Make `module`'s (fedlodrop.round.client's) device steps raise for the devices in `spec`."""
    setattr_(module, "device_step", _raising(module.device_step, spec))
    setattr_(module, "secure_step", _raising(module.secure_step, spec))
