"""Several processes per host: --local-device-ids names each process's devices."""
import pytest

from wan_runtime import distributed


def test_local_device_ids_parse():
    assert distributed.parse_device_ids(None) is None
    assert distributed.parse_device_ids("0,1") == [0, 1] and distributed.parse_device_ids("3") == [3]
    for bad in ("a,b", "", "0,0", "-1"):
        with pytest.raises(distributed.DistributedError, match="--local-device-ids"):
            distributed.parse_device_ids(bad)


def test_local_device_ids_reach_jax(monkeypatch):
    import jax

    seen, collectives = {}, jax.config.jax_cpu_collectives_implementation
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: seen.update(args=a, **k))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    try:
        assert distributed.initialize("127.0.0.1:1234", 2, 1, "2,3") is True
    finally:  # initialize picks gloo for CPU collectives: put back this process's setting
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    assert seen["args"] == ("127.0.0.1:1234", 2, 1) and seen["local_device_ids"] == [2, 3]
