"""Plugin loading: entry points, isolation of broken plugins, strict mode, allow/deny lists."""

from __future__ import annotations

import pytest
import torch

from slipstream import ops
from slipstream.plugins import PluginError, register_plugin, reload, system
from slipstream.registry import RegistrationError
from tests.plugin_fixtures import plugin_installer  # noqa: F401

GOOD = '''
from slipstream import hookimpl
from slipstream.ops.swiglu import reference

def swiglu(gate, up):
    """Plain swiglu (a correct implementation)."""
    return reference(gate, up)

@hookimpl
def slipstream_register_kernels(registry):
    registry.add("swiglu", "good.swiglu", swiglu, kind="vendor")
'''

RAISES_ON_IMPORT = '''
raise ImportError("libacme_runtime.so: cannot open shared object file")
'''

WRONG_SIGNATURE = '''
from slipstream import hookimpl

def rms_norm(inp, w, eps=1e-6, offset=0.0):
    return inp

@hookimpl
def slipstream_register_kernels(registry):
    registry.add("swiglu", "badsig.fine_before", lambda gate, up: gate * up, kind="vendor")
    registry.add("rms_norm", "badsig.rms_norm", rms_norm, kind="vendor")
'''

HOOK_RAISES = '''
from slipstream import hookimpl

@hookimpl
def slipstream_register_kernels(registry):
    raise RuntimeError("device query failed")
'''

DUPLICATE = '''
from slipstream import hookimpl
from slipstream.ops.swiglu import reference

@hookimpl
def slipstream_register_kernels(registry):
    registry.add("swiglu", "good.swiglu", reference, kind="vendor")
'''


def test_good_plugin_loads_from_its_entry_point(plugin_installer):  # noqa: F811
    plugin_installer.install("good", GOOD, version="2.3.4")
    sys_ = reload()
    record = sys_.records["good"]
    assert record.status == "loaded" and record.version == "2.3.4"
    assert record.distribution == "slipstream-testplugin-good"
    assert record.implementations == ["good.swiglu"]
    assert sys_.registry.find("good.swiglu").plugin == "good"


@pytest.mark.parametrize(("source", "message"), [
    (RAISES_ON_IMPORT, "import failed: ImportError: libacme_runtime.so"),
    (WRONG_SIGNATURE, "invalid registration: .*signature \\(inp, w, eps, offset\\) does not match"),
    (HOOK_RAISES, "registration raised: RuntimeError: device query failed"),
])
def test_broken_plugin_is_reported_and_skipped_whole(plugin_installer, source, message):  # noqa: F811
    plugin_installer.install("good", GOOD)
    plugin_installer.install("broken", source)
    with pytest.warns(RuntimeWarning, match="plugin 'broken' skipped"):
        sys_ = reload()
    record = sys_.records["broken"]
    assert record.status == "failed"
    assert pytest.importorskip("re").search(message, record.error), record.error
    assert not [i for i in sys_.registry.implementations() if i.plugin == "broken"]  # nothing half-registered
    assert sys_.records["good"].status == "loaded"
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ops.swiglu(gate, up), torch.nn.functional.silu(gate) * up)


def test_duplicate_names_are_rejected(plugin_installer):  # noqa: F811
    plugin_installer.install("good", GOOD)
    plugin_installer.install("zdup", DUPLICATE)
    with pytest.warns(RuntimeWarning, match="plugin 'zdup' skipped.*already registered"):
        sys_ = reload()
    assert sys_.records["zdup"].status == "failed"


def test_strict_mode_turns_failures_into_errors(plugin_installer, monkeypatch):  # noqa: F811
    plugin_installer.install("broken", RAISES_ON_IMPORT)
    monkeypatch.setenv("SLIPSTREAM_STRICT", "1")
    with pytest.raises(PluginError, match="plugin 'broken'.*import failed"):
        reload()
    monkeypatch.delenv("SLIPSTREAM_STRICT")


def test_allow_and_deny_lists(plugin_installer, monkeypatch):  # noqa: F811
    plugin_installer.install("good", GOOD)
    monkeypatch.setenv("SLIPSTREAM_DISABLE_PLUGINS", "good")
    assert reload().records["good"].status == "disabled"
    monkeypatch.delenv("SLIPSTREAM_DISABLE_PLUGINS")
    monkeypatch.setenv("SLIPSTREAM_PLUGINS", "template")
    sys_ = reload()
    assert sys_.records["good"].status == "disabled"
    assert sys_.records["template"].status == "loaded"
    assert sys_.records["reference"].status == "loaded"  # core's references are never disabled
    monkeypatch.delenv("SLIPSTREAM_PLUGINS")  # before plugin_installer's teardown reloads


def test_first_party_backends_load_like_any_plugin():
    sys_ = system()
    for name, dist in (("nvidia", "slipstream-nvidia"), ("rocm", "slipstream-rocm"), ("xpu", "slipstream-xpu"),
                       ("template", "slipstream-template")):
        assert sys_.records[name].status == "loaded", sys_.records[name]
        assert sys_.records[name].distribution == dist


def test_device_detection_hook_for_a_new_device_kind():
    from slipstream import hookimpl
    from slipstream.device import DeviceInfo, device_info

    class Acme:
        @hookimpl
        def slipstream_detect_device(self, device):
            if device.type == "meta":
                return DeviceInfo(vendor="other", type="meta", name="Acme NPU", arch="acme1", warp_size=16)
            return None

    register_plugin(Acme(), "acme-npu")
    device_info.cache_clear()
    info = device_info(torch.device("meta"))
    assert (info.name, info.arch, info.warp_size) == ("Acme NPU", "acme1", 16)
    reload()


def test_registry_validation_messages():
    reg = system().registry.staging("t")
    with pytest.raises(RegistrationError, match="unknown op 'rmsnorm'"):
        reg.add("rmsnorm", "t.x", lambda x, weight, eps=1e-6, offset=0.0: x)
    with pytest.raises(RegistrationError, match="has no `config` parameter"):
        reg.add("swiglu", "t.y", lambda gate, up: gate, configs=[{"BLOCK": 64}])
    with pytest.raises(RegistrationError, match="kind must be one of"):
        reg.add("swiglu", "t.z", lambda gate, up: gate, kind="fast")
    with pytest.raises(RegistrationError, match="already registered"):
        reg.add("swiglu", "reference.swiglu", lambda gate, up: gate)
