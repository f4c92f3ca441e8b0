"""The ``kvshard`` command line: plan arithmetic, errors, JSON, demo/bench pass-through."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvshard import cli
from kvshard._presets import PRESETS

GiB = 2**30
LLAMA_70B_1X8 = ["plan", "--model", "llama-3-70b", "--mesh", "1x8", "--hbm-per-device", "16GiB"]


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """Runs ``kvshard argv`` in-process; returns (exit status, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors and --help exit
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def plan_json(capsys, argv: list[str]) -> dict:
    code, out, err = run(capsys, [*argv, "--json"])
    assert code == 0, err
    return json.loads(out)


# ------------------------------------------------------------------ arithmetic


def test_llama_3_70b_on_1x8_with_16gib(capsys):
    plan = plan_json(capsys, LLAMA_70B_1X8)
    # Computed by hand: 8 KV heads over 8 devices -> one head, i.e. 2 combined rows (K and V)
    # per device; bf16 packs 2 rows per 32-bit word, so no packing pad; head_dim 128 needs no
    # lane pad. One page of one layer: 32 slots x 2 rows x 128 x 2 bytes.
    per_layer = 32 * 2 * 128 * 2
    assert plan["page_bytes_per_layer"] == per_layer == 16_384
    page = 80 * per_layer  # a page id spans all 80 layers
    assert plan["page_bytes"] == page == 1_310_720
    pages = 16 * GiB // page
    assert plan["pages_per_device"] == pages == 13_107
    assert plan["usable_pages_per_device"] == pages - 1  # page 0 is the null page
    assert plan["tokens_per_group"] == plan["tokens_total"] == (pages - 1) * 32 == 419_392
    assert plan["pages_per_sequence"] == 8192 // 32
    assert plan["sequences_per_group"] == plan["sequences_total"] == (pages - 1) // 256 == 51
    assert plan["replication"] == 1
    assert plan["local_shape"] == [80, pages * 32, 2, 128]
    assert plan["global_shape"] == [80, pages * 32, 16, 128]
    waste = plan["waste_bytes"]
    assert waste["head_dim_padding"] == waste["dtype_packing"] == waste["head_replication"] == 0
    assert waste["null_page"] == page
    assert waste["budget_remainder"] == 16 * GiB - pages * page == 262_144
    assert plan["kv_bytes"] + sum(waste.values()) == 16 * GiB


def test_table_shows_the_same_numbers(capsys):
    code, out, _ = run(capsys, LLAMA_70B_1X8)
    assert code == 0
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if "  " in line}
    assert "16,384" in lines["bytes per page per device, 1 layer"]
    assert "1,310,720" in lines["bytes per page per device, 80 layers"]
    assert "13,107" in lines["pages per device (= per DP pool)"]
    assert "419,392" in lines["tokens per DP group"]
    assert " 51 " in lines["concurrent sequences of 8,192 tokens"]
    assert "0.00%" in lines["head replication (x1)"]


def test_replication_packing_and_head_dim_padding(capsys):
    # 4 KV heads on a 2x8 mesh: each head on 2 devices, one per device (2 combined rows);
    # int8 packs 4 rows per word -> 2 pad rows; head_dim 96 is stored as 128.
    argv = ["plan", "--layers", "10", "--kv-heads", "4", "--head-dim", "96", "--dtype", "int8"]
    argv += ["--page-size", "16", "--mesh", "2x8", "--hbm-per-device", "100MB", "--context", "100"]
    plan = plan_json(capsys, argv)
    assert plan["replication"] == 2
    assert plan["combined_heads_per_device"] == 2 and plan["packed_rows_per_device"] == 4
    page = 10 * 16 * 4 * 128 * 1
    assert plan["page_bytes"] == page
    pages = 100_000_000 // page
    usable = pages - 1
    assert plan["pages_per_device"] == pages
    assert plan["tokens_total"] == 2 * usable * 16
    assert plan["sequences_per_group"] == usable // 7  # ceil(100 / 16) pages each
    rows = 10 * 16 * usable  # slot rows of the usable pages, every layer
    waste = plan["waste_bytes"]
    assert waste["dtype_packing"] == rows * 2 * 128  # 2 pad rows of 128 lanes
    assert waste["head_dim_padding"] == rows * 2 * 32  # 2 real rows, 32 pad lanes each
    assert waste["head_replication"] == rows * 2 * 96 // 2  # half the real bytes are copies
    assert plan["kv_bytes"] == rows * 2 * 96 // 2
    assert plan["kv_bytes"] + sum(waste.values()) == 100_000_000
    assert plan["waste_percent"]["dtype_packing"] == pytest.approx(
        100 * waste["dtype_packing"] / 100_000_000
    )


def test_explicit_flags_override_the_preset(capsys):
    base = plan_json(capsys, ["plan", "--model", "qwen2.5-7b", "--hbm-per-device", "1GiB"])
    assert (base["num_layers"], base["num_kv_heads"], base["head_dim"]) == (28, 4, 128)
    over = plan_json(
        capsys, ["plan", "--model", "qwen2.5-7b", "--layers", "2", "--hbm-per-device", "1GiB"]
    )
    assert (over["num_layers"], over["num_kv_heads"]) == (2, 4)
    assert over["page_bytes"] * 14 == base["page_bytes"]


def test_presets():
    assert {name: (p.num_layers, p.num_kv_heads, p.head_dim) for name, p in PRESETS.items()} == {
        "llama-3-8b": (32, 8, 128),
        "llama-3-70b": (80, 8, 128),
        "mistral-7b": (32, 8, 128),
        "qwen2.5-72b": (80, 8, 128),
        "qwen2.5-7b": (28, 4, 128),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16GiB", 16 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("1000000", 1_000_000),
        ("2 kib", 2048),
        ("1.5KiB", 1536),
        ("7B", 7),
    ],
)
def test_parse_bytes(text, expected):
    assert cli.parse_bytes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("2x4", (2, 4)), ("1X8", (1, 8)), ("1x1", (1, 1))])
def test_parse_mesh(text, expected):
    assert cli.parse_mesh(text) == expected


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--model", "llama-3-70b", "--mesh", "1x6"], ["--mesh", "1x6", "num_kv_heads=8", "16"]),
        (["--model", "llama-3-70b", "--mesh", "2by4"], ["--mesh", "'2by4'", "DATAxMODEL"]),
        (["--model", "llama-3-70b", "--mesh", "0x8"], ["--mesh", ">= 1"]),
        (
            ["--model", "llama-3-70b", "--mesh", "1x8", "--hbm-per-device", "2MiB"],
            ["--hbm-per-device", "2,097,152", "1,310,720", "2,621,440"],
        ),
        (["--model", "llama-3-70b", "--hbm-per-device", "16G"], ["--hbm-per-device", "'G'"]),
        (["--model", "llama-3-70b", "--hbm-per-device", "lots"], ["--hbm-per-device", "'lots'"]),
        (["--model", "gpt-x"], ["--model", "'gpt-x'", "llama-3-70b", "qwen2.5-7b"]),
        (["--model", "llama-3-70b", "--dtype", "float64"], ["--dtype", "'float64'", "bfloat16"]),
        (["--model", "llama-3-70b", "--page-size", "0"], ["--page-size", ">= 1"]),
        (["--layers", "4"], ["--kv-heads", "--head-dim", "--model"]),
    ],
)
def test_errors_exit_2_naming_the_argument(capsys, extra, fragments):
    argv = ["plan", *extra]
    if "--hbm-per-device" not in extra:
        argv += ["--hbm-per-device", "16GiB"]
    code, out, err = run(capsys, argv)
    assert code == 2
    assert out == ""
    message = err.strip().splitlines()[-1]
    assert message.startswith("kvshard plan: error:")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_exactly_two_pages_is_enough(capsys):
    plan = plan_json(
        capsys, ["plan", "--model", "llama-3-70b", "--mesh", "1x8", "--hbm-per-device", "2621440"]
    )
    assert plan["pages_per_device"] == 2 and plan["tokens_per_group"] == 32
    assert plan["sequences_total"] == 0


# ------------------------------------------------------------------ entry points


def test_python_dash_m_json_round_trip(capsys):
    result = subprocess.run(
        [sys.executable, "-m", "kvshard", *LLAMA_70B_1X8, "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert json.loads(result.stdout) == plan_json(capsys, LLAMA_70B_1X8)


def test_missing_script_is_a_clear_error(tmp_path, capsys):
    assert cli.run_script("demo", [], root=tmp_path) == 2
    err = capsys.readouterr().err
    assert "examples/tp_decode.py not found" in err and str(tmp_path) in err


def test_script_pass_through(tmp_path, capfd):
    script = tmp_path / "examples" / "tp_decode.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    assert cli.run_script("demo", ["--repeats", "1", "--help"], root=tmp_path) == 3
    assert "args ['--repeats', '1', '--help']" in capfd.readouterr().out


def test_bench_runs_the_packaged_suite(capfd):
    # The benchmarks ship in the package, so `kvshard bench` works without a source tree.
    assert cli.MODULES == {
        "bench": "kvshard.benchmarks",
        "bench-cache": "kvshard.benchmarks.cache_update",
    }
    assert cli.main(["bench", "--help"]) == 0
    assert "--quick" in capfd.readouterr().out
    assert cli.main(["bench-cache", "--help"]) == 0
    assert "--dtype" in capfd.readouterr().out


def test_demo_and_bench_point_into_the_source_tree():
    root = Path(cli.__file__).resolve().parents[1]
    assert (root / "benchmarks" / "host_step.py").is_file()
    assert cli.SCRIPTS["demo"] == ("examples", "tp_decode.py")


def test_help_lists_the_subcommands(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    for command in ("plan", "demo", "bench"):
        assert command in out
