"""Spec for the daemon's default record AEAD (daemon/cpufeatures.py, daemon/config.py).

A node whose config.toml names no ``aeads`` offers AES-256-GCM first where /proc/cpuinfo
lists AES instructions (``flags`` on x86, ``Features`` on arm64) and ChaCha20-Poly1305
first elsewhere; ``[node] aeads`` in config.toml replaces that order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pqtunnel.crypto.suites import Aead
from pqtunneld.config import load_config
from pqtunneld.cpufeatures import has_aes_instructions, hardware_aeads

pytestmark = pytest.mark.unit

AES_FIRST = (Aead.AES_256_GCM, Aead.CHACHA20_POLY1305)
CHACHA_FIRST = (Aead.CHACHA20_POLY1305, Aead.AES_256_GCM)

# One processor block each, as Linux prints them (x86: a Xeon VM with AES-NI, QEMU's
# default "qemu64" model without; arm64: a Neoverse-N1 with the Cryptography Extension,
# a Raspberry Pi 4's Cortex-A72 without).
X86_WITH_AES = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 167
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 \
fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm
bugs\t\t: spectre_v1 spectre_v2 spec_store_bypass swapgs retbleed
bogomips\t: 5200.00

"""
X86_WITHOUT_AES = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 15
model\t\t: 107
model name\t: QEMU Virtual CPU version 2.5+
flags\t\t: fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 syscall \
nx lm rep_good nopl cpuid extd_apicid tsc_known_freq pni cx16 x2apic hypervisor lahf_lm cmp_legacy 3dnowprefetch vmmcall
bugs\t\t: fxsave_leak sysret_ss_attrs null_seg spectre_v1 spectre_v2

"""
ARM64_WITH_AES = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

"""
ARM64_WITHOUT_AES = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


@pytest.mark.parametrize(("cpuinfo", "expected"), [
    pytest.param(X86_WITH_AES, True, id="x86-aes-ni"),
    pytest.param(X86_WITHOUT_AES, False, id="x86-qemu64"),
    pytest.param(ARM64_WITH_AES, True, id="arm64-neoverse-n1"),
    pytest.param(ARM64_WITHOUT_AES, False, id="arm64-cortex-a72"),
    pytest.param(X86_WITH_AES * 2, True, id="two-processors"),
    pytest.param("", False, id="empty"),
])
def test_aes_instructions_are_read_from_the_flags_or_features_line(cpuinfo: str, expected: bool) -> None:
    assert has_aes_instructions(cpuinfo) is expected


def test_only_the_whole_aes_token_counts_not_vaes_or_a_model_name() -> None:
    text = "model name\t: AES accelerator board\nflags\t\t: fpu sse2 vaes vpclmulqdq\n"
    assert has_aes_instructions(text) is False


def test_the_faster_aead_on_the_cpu_comes_first(tmp_path: Path) -> None:
    with_aes, without = tmp_path / "aes", tmp_path / "none"
    with_aes.write_text(ARM64_WITH_AES)
    without.write_text(X86_WITHOUT_AES)
    assert hardware_aeads(with_aes) == AES_FIRST
    assert hardware_aeads(without) == CHACHA_FIRST


def test_unreadable_cpuinfo_falls_back_to_chacha20_first(tmp_path: Path) -> None:
    assert hardware_aeads(tmp_path / "missing") == CHACHA_FIRST


def test_a_node_without_configured_aeads_uses_this_machines_order(tmp_path: Path) -> None:
    this_machine = has_aes_instructions(Path("/proc/cpuinfo").read_text())
    assert load_config(tmp_path).aeads == (AES_FIRST if this_machine else CHACHA_FIRST)


def test_configured_aeads_replace_the_hardware_order(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('[node]\naeads = ["chacha20-poly1305"]\n')
    assert load_config(tmp_path).aeads == (Aead.CHACHA20_POLY1305,)
