"""The ``kvshard`` command line: plan arithmetic, errors, JSON, demo/bench pass-through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import kvshard._launch
from kvshard import cli
from kvshard._geometry.hf_config import PRESETS, preset_config, read_model_config

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
    shapes = {}
    for name in PRESETS:
        g = read_model_config(preset_config(name))
        groups = {t: len(layers) for t, layers in g.layer_groups.items()}
        shapes[name] = (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, g.sliding_window, groups)
    full = ("full",)
    assert shapes == {
        "llama-3-8b": (32, 8, 128, "bfloat16", None, {full: 32}),
        "llama-3-70b": (80, 8, 128, "bfloat16", None, {full: 80}),
        "mistral-7b": (32, 8, 128, "bfloat16", 4096, {("sliding", 4096): 32}),
        "qwen2.5-0.5b": (24, 2, 64, "bfloat16", None, {full: 24}),  # 896 / 14 heads
        "qwen2.5-72b": (80, 8, 128, "bfloat16", None, {full: 80}),  # use_sliding_window: false
        "qwen2.5-7b": (28, 4, 128, "bfloat16", None, {full: 28}),
        "gemma-2-9b": (42, 8, 256, "bfloat16", None, {("sliding", 4096): 21, full: 21}),
        "gemma-3-27b": (62, 16, 128, "bfloat16", None, {("sliding", 1024): 52, full: 10}),
        "gpt-oss-20b": (24, 8, 64, "bfloat16", None, {("sliding", 128): 12, full: 12}),
        "gpt-oss-120b": (36, 8, 64, "bfloat16", None, {("sliding", 128): 18, full: 18}),
        "llama-4-scout": (48, 8, 128, "bfloat16", None, {("chunked", 8192): 36, full: 12}),
        # MLA: one latent row of kv_lora_rank 512 + qk_rope_head_dim 64 per token.
        "deepseek-v3": (61, 1, 576, "bfloat16", None, {full: 61}),
        "kimi-k2": (61, 1, 576, "bfloat16", None, {full: 61}),
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


def test_host_memory_adds_the_host_tier(capsys):
    plan = plan_json(capsys, [*LLAMA_70B_1X8, "--host-memory", "256GiB"])
    host = plan["host_tier"]
    # By hand: 256 GiB over the 8 devices of the mesh = 32 GiB each; pages of 1,310,720 bytes
    # (as on the device): 34,359,738,368 // 1,310,720 = 26,214 pages of 32 tokens.
    assert host["devices_per_host"] == 8 and host["bytes_per_device"] == 32 * GiB
    assert host["pages_per_device"] == 26_214
    assert host["tokens_per_group"] == host["tokens_total"] == 26_214 * 32 == 838_848
    assert host["sequences_per_group"] == 26_214 // 256 == 102  # 8,192-token sequences
    assert host["device_and_host_tokens_per_group"] == (13_106 + 26_214) * 32
    code, out, _ = run(capsys, [*LLAMA_70B_1X8, "--host-memory", "256GiB"])
    assert code == 0
    assert "host tier (256 GiB of pinned host memory per host, 8 devices)" in out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if "  " in line}
    assert "26,214" in lines["host pages per device (= per DP pool)"]
    assert "838,848" in lines["host tokens per DP group"]
    # Four devices per host: 64 GiB each, 68,719,476,736 // 1,310,720 = 52,428 pages.
    argv = [*LLAMA_70B_1X8, "--host-memory", "256GiB", "--devices-per-host", "4"]
    assert plan_json(capsys, argv)["host_tier"]["pages_per_device"] == 52_428
    assert plan_json(capsys, LLAMA_70B_1X8)["host_tier"] is None


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (
            ["--model", "llama-3-70b", "--mesh", "1x8", "--host-memory", "8MiB"],
            ["--host-memory", "1,048,576 bytes per device", "1,310,720", "10,485,760"],
        ),
        (["--model", "llama-3-70b", "--host-memory", "lots"], ["--host-memory", "'lots'"]),
        (
            ["--model", "llama-3-70b", "--host-memory", "1GiB", "--devices-per-host", "0"],
            ["--devices-per-host", ">= 1"],
        ),
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
    argv = ["plan", "--model", "llama-3-70b", "--mesh", "1x8", "--hbm-per-device", "2621440"]
    plan = plan_json(capsys, [*argv, "--context", "32"])
    assert plan["pages_per_device"] == 2 and plan["tokens_per_group"] == 32
    assert plan["sequences_total"] == 1


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


def test_help_lists_the_subcommands(capsys):
    code, out, _ = run(capsys, ["--help"])
    assert code == 0
    for command in ("plan", "demo", "bench", "bench-cache"):
        assert command in out


# ------------------------------------------------------------------ errors: one line, helpful


def one_line_error(capsys, argv: list[str]) -> str:
    code, out, err = run(capsys, argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err  # no usage block before the message
    assert err.rstrip().endswith("--help)"), err
    return err


def test_negative_size_is_a_size_error(capsys):
    err = one_line_error(capsys, ["plan", "--model", "llama-3-8b", "--hbm-per-device", "-16GiB"])
    assert err.startswith("kvshard plan: error: argument --hbm-per-device: '-16GiB' is negative")
    err = one_line_error(capsys, ["plan", "--model", "llama-3-8b", "--hbm-per-device", "-1"])
    assert "argument --hbm-per-device: '-1' is negative" in err


def test_negative_int_names_its_argument(capsys):
    err = one_line_error(
        capsys, ["plan", "--model", "llama-3-8b", "--hbm-per-device", "1GiB", "--context", "-5"]
    )
    assert "argument --context: -5 must be >= 1" in err


def test_context_larger_than_the_cache_says_so(capsys):
    argv = ["plan", "--model", "llama-3-70b", "--mesh", "1x8", "--hbm-per-device", "2621440"]
    err = one_line_error(capsys, argv)  # default context 8192: 256 pages, 1 usable
    # (256 + 1) pages of 1,310,720 bytes: the null page and one sequence.
    assert "argument --context: 8,192 tokens need 256 pages per sequence" in err
    assert "holds 1 usable page(s)" in err and f"{257 * 1_310_720:,} bytes" in err


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("pln", "plan"), ("bench_cache", "bench-cache"), ("dmeo", "demo")]
)
def test_mistyped_command_suggests_the_right_one(capsys, typo, suggestion):
    err = one_line_error(capsys, [typo, "--hbm-per-device", "1GiB"])
    assert err.startswith(f"kvshard: error: unknown command {typo!r}; did you mean {suggestion!r}?")


def test_unrelated_command_lists_the_commands(capsys):
    err = one_line_error(capsys, ["train"])
    assert "did you mean" not in err and "plan, demo, bench, bench-cache, serve" in err


def test_serve_refuses_bad_arguments_in_one_line(capsys, tmp_path):
    from kvshard.server.main import main as serve_main

    for argv, needle in (
        ([], "the following arguments are required: --checkpoint"),
        (["--checkpoint", str(tmp_path)], "config.json does not exist"),
        (["--checkpoint", str(tmp_path), "--mesh", "2"], "expected DxM"),
        (["--checkpoint", str(tmp_path), "--port", "70000"], "must be in [0, 65535]"),
        (["--checkpoint", str(tmp_path), "--host-memory", "lots"], "is not a size"),
    ):
        with pytest.raises(SystemExit) as exit_:
            serve_main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and needle in err, err


def test_mistyped_option_suggests_the_right_one(capsys):
    err = one_line_error(capsys, ["plan", "--model", "llama-3-8b", "--hbm-per-devcie", "1GiB"])
    assert "unrecognized option --hbm-per-devcie; did you mean --hbm-per-device?" in err


def test_abbreviated_option_still_works(capsys):
    plan = plan_json(
        capsys, ["plan", "--model", "llama-3-8b", "--hbm-per", "1GiB", "--context", "64"]
    )
    assert plan["hbm_per_device"] == 2**30


def test_mistyped_model_suggests_the_preset(capsys):
    err = one_line_error(capsys, ["plan", "--model", "llama-3-8", "--hbm-per-device", "1GiB"])
    assert "did you mean 'llama-3-8b'?" in err


def test_model_and_config_are_exclusive(capsys, tmp_path):
    err = one_line_error(
        capsys,
        ["plan", "--model", "llama-3-8b", "--config", str(tmp_path), "--hbm-per-device", "1GiB"],
    )
    assert "--config" in err and "--model" in err


# ------------------------------------------------------------------ kv dtype, sliding windows


def test_kv_dtype_shows_the_gain_over_bfloat16(capsys):
    # 8 KV heads on one device: 16 combined rows, a multiple of every packing, so int8 halves
    # the bytes of a token exactly: 32 layers x 16 rows x 128 x 1 byte = 65,536.
    base = ["plan", "--model", "llama-3-8b", "--hbm-per-device", "1GiB"]
    plan = plan_json(capsys, [*base, "--kv-dtype", "int8"])
    assert plan["bytes_per_token"] == 32 * 16 * 128 == 65_536
    assert plan["bfloat16_bytes_per_token"] == 2 * 65_536
    tokens = (2**30 // (32 * 65_536) - 1) * 32  # pages of 32 tokens, minus the null page
    bf16_tokens = (2**30 // (64 * 65_536) - 1) * 32
    assert plan["tokens_per_group"] == tokens == 16_352
    assert plan["capacity_vs_bfloat16"] == pytest.approx(tokens / bf16_tokens)
    code, out, _ = run(capsys, [*base, "--kv-dtype", "int8"])
    assert code == 0
    row = next(line for line in out.splitlines() if "bytes per token" in line)
    assert "65,536" in row and f"x{tokens / bf16_tokens:.2f} the tokens of bfloat16" in row
    assert "131,072 bytes per token" in row


def test_kv_dtype_gain_can_be_none_at_all(capsys):
    # One KV head per device (1x8): 2 rows, padded to int8's packing of 4 -> no gain at all.
    argv = ["plan", "--model", "llama-3-8b", "--mesh", "1x8", "--hbm-per-device", "1GiB"]
    plan = plan_json(capsys, [*argv, "--kv-dtype", "fp8"])
    assert plan["dtype"] == "float8_e4m3fn" and plan["capacity_vs_bfloat16"] == 1.0


def window_pages_by_simulation(window: int, page_size: int, context: int) -> int:
    """Most live pages over a decode, simulating the release rule on a set of pages."""
    live: set[int] = set()
    most = 0
    for n in range(context):  # the step that computes the token at position n
        first_needed = max(0, n - window + 1)  # the oldest key any query from n on reads
        live = {page for page in live if (page + 1) * page_size > first_needed}  # release
        live.add(n // page_size)  # grow: the page the new token is written to
        most = max(most, len(live))
    return most


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("window", [1, 2, 3, 15, 16, 17, 33, 64])
def test_window_pages_matches_a_simulation(window, page_size):
    for context in (1, 2, page_size, window, window + 1, 3 * window + 2 * page_size + 5):
        expected = window_pages_by_simulation(window, page_size, context)
        assert cli.window_pages(window, page_size, context) == expected, (window, context)
    long = 4 * window + 4 * page_size
    assert cli.window_pages(window, page_size, long) == -(-(window - 1) // page_size) + 1


@pytest.mark.parametrize("page_size", [1, 4, 16, 32])
@pytest.mark.parametrize("window", [1, 2, 15, 16, 17, 4096])
def test_window_pages_agrees_with_the_allocator_bound(window, page_size):
    # The allocator's own bound for decode steps, reached once the context passes the window.
    from kvshard.allocator import sliding_window_pages

    long = window + 2 * page_size
    assert cli.window_pages(window, page_size, long) == sliding_window_pages(window, page_size)


@pytest.mark.parametrize(("window", "page_size"), [(1, 4), (6, 4), (8, 4), (9, 4), (17, 8)])
def test_window_pages_is_what_the_allocator_keeps(window, page_size):
    # Decode one request token by token with a windowed allocator: the most pages it held.
    from kvshard.allocator import PageAllocator

    for context in (3, window, window + 1, 3 * window + 2 * page_size):
        alloc = PageAllocator(
            64, page_size, max_requests=1, max_pages_per_request=64, sliding_window=window
        )
        most = 0
        for _ in range(context):
            alloc.allocate("r", 1)
            most = max(most, alloc.num_pages - 1 - alloc.num_free_pages)
        assert cli.window_pages(window, page_size, context) == most, (window, context)


def test_window_pages_rejects_bad_input():
    with pytest.raises(ValueError, match="window=0"):
        cli.window_pages(0, 16, 10)


def test_sliding_window_capacity_gain(capsys):
    # Mistral-7B-v0.1 ships sliding_window 4096: a decoding request holds at most
    # ceil(4095 / 32) + 1 = 129 pages instead of 8192 / 32 = 256.
    plan = plan_json(capsys, ["plan", "--model", "mistral-7b", "--hbm-per-device", "16GiB"])
    usable = 16 * GiB // (32 * 32 * 16 * 128 * 2) - 1
    w = plan["sliding_window"]
    assert usable == 4095 and plan["sequences_per_group"] == usable // 256 == 15
    assert w["window"] == 4096 and w["pages_per_sequence"] == 129
    assert w["sequences_per_group"] == usable // 129 == 31
    assert w["capacity_gain"] == pytest.approx(31 / 15)
    code, out, _ = run(capsys, ["plan", "--model", "mistral-7b", "--hbm-per-device", "16GiB"])
    assert code == 0
    assert "with sliding window 4,096" in out and "x2.07" in out


def test_sliding_window_flag_overrides_and_disables(capsys):
    base = ["plan", "--model", "mistral-7b", "--hbm-per-device", "16GiB"]
    assert plan_json(capsys, [*base, "--sliding-window", "0"])["sliding_window"] is None
    plan = plan_json(capsys, [*base, "--sliding-window", "100", "--page-size", "16"])
    assert plan["sliding_window"]["pages_per_sequence"] == 8  # ceil(99 / 16) + 1


def test_sliding_window_lets_a_long_context_fit(capsys):
    # 2 usable pages of 32: a 8192-token context fits only because the window keeps 2 pages.
    argv = ["plan", "--layers", "1", "--kv-heads", "1", "--head-dim", "128", "--mesh", "1x1"]
    argv += ["--hbm-per-device", str(3 * 32 * 2 * 128 * 2), "--sliding-window", "32"]
    plan = plan_json(capsys, argv)
    assert plan["sequences_per_group"] == 0
    assert plan["sliding_window"]["sequences_per_group"] == 1
    assert plan["sliding_window"]["capacity_gain"] is None


# ------------------------------------------------------------------ --config


LLAMA_3_8B_CONFIG = {  # meta-llama/Meta-Llama-3-8B config.json, as published
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}


def test_config_gives_the_preset_capacity(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_3_8B_CONFIG))
    flags = ["--mesh", "2x4", "--hbm-per-device", "12GB", "--context", "4096"]
    from_config = plan_json(capsys, ["plan", "--config", str(path), *flags])
    from_preset = plan_json(capsys, ["plan", "--model", "llama-3-8b", *flags])
    assert from_config["model"] == str(path) and from_preset["model"] == "llama-3-8b"
    del from_config["model"], from_preset["model"]
    assert from_config == from_preset
    assert from_config["tokens_total"] == 2 * (12 * 10**9 // (32 * 32 * 4 * 128 * 2) - 1) * 32
    # A model directory works as Hugging Face tools accept it.
    assert (
        plan_json(capsys, ["plan", "--config", str(tmp_path), *flags])["tokens_total"]
        == (from_preset["tokens_total"])
    )


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"kv_lora_rank": 512}, "qk_rope_head_dim is missing (multi-head latent attention"),
        ({"num_hidden_layers": None}, "num_hidden_layers is missing"),
        ({"num_hidden_layers": "32"}, "num_hidden_layers='32' must be a positive integer"),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0 must be a positive integer"),
        ({"hidden_size": 4100}, "hidden_size=4100 is not a multiple of num_attention_heads=32"),
        ({"torch_dtype": "int4"}, "torch_dtype='int4' is not one of"),
        ({"torch_dtype": None}, "torch_dtype is missing; pass --kv-dtype"),
        ({"sliding_window": -1}, "sliding_window=-1 must be a positive integer or null"),
    ],
)
def test_bad_config_is_one_line_naming_the_field(capsys, tmp_path, change, fragment):
    config = {**LLAMA_3_8B_CONFIG, **change}
    config = {k: v for k, v in config.items() if v is not None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    err = one_line_error(capsys, ["plan", "--config", str(path), "--hbm-per-device", "1GiB"])
    assert err.startswith(f"kvshard plan: error: argument --config: {path}"), err
    assert fragment in err, err


@pytest.mark.parametrize(
    ("content", "fragment"), [("{", "not JSON"), ("[1, 2]", "JSON object, got list")]
)
def test_unreadable_config(capsys, tmp_path, content, fragment):
    path = tmp_path / "config.json"
    path.write_text(content)
    err = one_line_error(capsys, ["plan", "--config", str(path), "--hbm-per-device", "1GiB"])
    assert fragment in err
    err = one_line_error(
        capsys, ["plan", "--config", str(tmp_path / "nope.json"), "--hbm-per-device", "1GiB"]
    )
    assert "nope.json: cannot read the config" in err


def test_kv_dtype_fills_in_a_missing_torch_dtype(capsys, tmp_path):
    config = {k: v for k, v in LLAMA_3_8B_CONFIG.items() if k != "torch_dtype"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["plan", "--config", str(path), "--hbm-per-device", "1GiB", "--kv-dtype", "fp8"]
    assert plan_json(capsys, argv)["dtype"] == "float8_e4m3fn"


def test_mixed_window_layers_are_planned_as_groups(capsys, tmp_path):
    config = {**LLAMA_3_8B_CONFIG, "sliding_window": 1024, "num_hidden_layers": 4}
    config["layer_types"] = ["sliding_attention"] * 3 + ["full_attention"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    plan = plan_json(capsys, ["plan", "--config", str(path), "--hbm-per-device", "2GiB"])
    assert plan["sliding_window"] is None and plan["notes"] == []
    rows = plan["layer_groups"]["groups"]
    assert [(r["kind"], r["size"], r["layers"]) for r in rows] == [
        ("sliding", 1024, [0, 1, 2]),
        ("full", None, [3]),
    ]


# ------------------------------------------------------------------ query heads (issue 18)


def test_config_whose_query_heads_do_not_split_is_refused_with_the_padding(capsys, tmp_path):
    """14 query heads over 2 KV heads (groups of 7) on a 4-way head axis: each KV head sits on
    2 devices, which would each take 3.5 query heads; padding each group to 8 (16 in all)
    splits. kvshard.attention refuses the unpadded layout, so the planner must too."""
    config = {**LLAMA_3_8B_CONFIG, "num_attention_heads": 14, "num_key_value_heads": 2}
    config["head_dim"] = 128
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["plan", "--config", str(path), "--mesh", "1x4", "--hbm-per-device", "1GiB"]
    err = one_line_error(capsys, argv)
    assert err.startswith("kvshard plan: error: argument --mesh: 1x4: num_q_heads=14"), err
    assert "Pad each KV head's group from 7 to 8 query heads (16 in all" in err, err
    assert "head axis size of 1, 2, 14" in err, err
    # The sizes it names work; so do the padded heads on the refused mesh.
    assert plan_json(capsys, [*argv[:4], "1x2", *argv[5:]])["q_heads_per_device"] == 7
    padded = plan_json(capsys, [*argv, "--q-heads", "16"])
    assert padded["num_q_heads"] == 16 and padded["q_heads_per_device"] == 4


def test_shipped_qwen_on_eight_devices_is_refused(capsys):
    """Qwen2.5-7B: 28 query heads, 4 KV heads. 1x8 was approved before though attention
    refuses it; 1x4 (7 query heads per device) is fine."""
    base = ["plan", "--model", "qwen2.5-7b", "--hbm-per-device", "16GiB"]
    err = one_line_error(capsys, [*base, "--mesh", "1x8"])
    assert "from 7 to 8 query heads (32 in all" in err, err
    assert plan_json(capsys, [*base, "--mesh", "1x4"])["q_heads_per_device"] == 7


@pytest.mark.parametrize(
    ("flags", "blamed"),
    [
        (["--model", "qwen2.5-7b", "--kv-heads", "3"], "--kv-heads"),
        (["--model", "qwen2.5-7b", "--q-heads", "30"], "--q-heads"),
    ],
)
def test_query_heads_not_a_multiple_of_kv_heads_name_the_flag(capsys, flags, blamed):
    err = one_line_error(capsys, ["plan", *flags, "--hbm-per-device", "1GiB"])
    assert err.startswith(f"kvshard plan: error: argument {blamed}: num_q_heads="), err
    assert "is not a multiple of num_kv_heads" in err


# ------------------------------------------------------------------ demo / bench dispatch


def test_scripts_name_the_command_in_their_help(tmp_path, capfd):
    script = tmp_path / "examples" / "tp_decode.py"
    script.parent.mkdir()
    (script.parent / "_sibling.py").write_text("VALUE = 7\n")
    script.write_text(
        "import argparse, sys\nfrom _sibling import VALUE\n"
        "print('sibling', VALUE, 'args', sys.argv[1:])\n"
        "argparse.ArgumentParser().parse_args()\n"
    )
    assert cli.run_script("demo", ["--help"], root=tmp_path) == 0
    out = capfd.readouterr().out
    assert "sibling 7 args ['--help']" in out  # imports its siblings, gets the arguments
    assert "usage: kvshard demo [-h]" in out


def test_script_pass_through(tmp_path, capfd):
    script = tmp_path / "examples" / "tp_decode.py"
    script.parent.mkdir()
    script.write_text("import sys\nprint('args', sys.argv[1:])\nsys.exit(3)\n")
    assert cli.run_script("demo", ["--repeats", "1", "--help"], root=tmp_path) == 3
    assert "args ['--repeats', '1', '--help']" in capfd.readouterr().out


def test_benchmark_commands_run_the_package_modules(capfd):
    """The benchmarks live only in the package (no source-tree script): every command's module
    exists, and `kvshard bench --help` runs kvshard.benchmarks, naming the command."""
    import importlib.util

    assert all(cli.SCRIPTS[name].source is None for name in cli.SCRIPTS if name != "demo")
    assert all(importlib.util.find_spec(s.module) for s in cli.SCRIPTS.values())
    assert cli.main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("usage: kvshard bench")
    assert "attention_decode" in out and "update_schedules" in out  # --only's choices


@pytest.mark.parametrize(
    ("source", "where"),
    [
        (("benchmarks", "x.py"), "and no source checkout"),
        (None, "; reinstall kvshard"),
    ],
)
def test_missing_script_is_a_clear_error(tmp_path, capsys, monkeypatch, source, where):
    monkeypatch.setitem(cli.SCRIPTS, "bench", cli.Script("kvshard.no_such_module", source, ""))
    monkeypatch.setattr(kvshard._launch, "_source_root", lambda: tmp_path)
    assert cli.main(["bench", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("kvshard bench: error: not installed: no module kvshard.no_such_module")
    assert where in err
    if source is not None:
        assert str(tmp_path / "benchmarks" / "x.py") in err


# ------------------------------------------------------------------ no JAX for planning


def test_plan_does_not_import_jax():
    code = (
        "import sys, kvshard, kvshard.cli\n"
        "assert kvshard.cli.main(['plan', '--model', 'llama-3-8b', '--hbm-per-device', '1GiB',"
        " '--kv-dtype', 'int8', '--json']) == 0\n"
        "spec = kvshard.CacheSpec.from_config(kvshard.cli.preset_config('mistral-7b'),"
        " page_size=16, num_pages=8)\n"
        "assert spec.num_layers == 32 and spec.dtype == 'bfloat16', spec\n"
        "assert 'kvshard.PageAllocator' in repr(kvshard.PageAllocator) or kvshard.PageAllocator\n"
        "print('jax' in sys.modules, 'jax' in [m.split('.')[0] for m in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False False"


def test_lazy_exports_resolve_and_are_listed():
    import kvshard

    for name in kvshard.__all__:
        assert getattr(kvshard, name) is not None, name
    assert set(kvshard.__all__) <= set(dir(kvshard))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kvshard.nope  # noqa: B018


def test_bench_cache_help_names_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "kvshard", "bench-cache", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: kvshard bench-cache ")
    assert "cache_update.py" not in result.stdout


def test_installed_module_runs_as_the_command(tmp_path, capfd, monkeypatch):
    # An installed script module is preferred to the source tree, and sees `kvshard demo`.
    (tmp_path / "fake_demo_module.py").write_text(
        "import argparse, sys\nprint('args', sys.argv[1:], __name__)\n"
        "argparse.ArgumentParser().parse_args()\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))  # find_spec in this process
    monkeypatch.setitem(
        cli.SCRIPTS, "demo", cli.Script("fake_demo_module", ("examples", "nope.py"), "")
    )
    assert cli.main(["demo", "--help"]) == 0
    out = capfd.readouterr().out
    assert "args ['--help'] __main__" in out and "usage: kvshard demo [-h]" in out


# ------------------------------------------------------------------ layer groups (issue 21)

GEMMA3 = ["plan", "--model", "gemma-3-27b", "--mesh", "1x8", "--hbm-per-device", "16GiB"]


def group_rows(plan):
    return {r["kind"]: r for r in plan["layer_groups"]["groups"]}


@pytest.mark.parametrize(
    ("context", "full_sequences", "grouped_pages", "grouped_sequences", "gain"),
    [
        # Gemma 3 27B: 62 layers (52 local, window 1024; 10 global), 16 KV heads, head_dim 128,
        # bfloat16. On 1x8 a device holds 2 heads = 4 rows (packing 2: no pad): one layer's
        # page is 32 x 4 x 128 x 2 B = 32,768 bytes.
        # Every layer full: a page id is 62 x 32,768 = 2,031,616 bytes; 16 GiB
        #   (17,179,869,184 B) // 2,031,616 = 8,456 pages, 8,455 usable.
        # Grouped (vLLM): KV-cache groups of 10 layers (the 10 global ones; the 52 local ones
        #   make ceil(52 / 10) = 6 groups): a page id is 10 x 32,768 = 327,680 bytes,
        #   17,179,869,184 // 327,680 = 52,428 pages, 52,427 usable. A request holds
        #   ceil(1023 / 32) + 1 = 33 pages in each local group (6 x 33 = 198) plus the global
        #   group's context / 32.
        # 32k: all full 8,455 // 1,024 = 8; grouped 1,024 + 198 = 1,222 pages,
        #   52,427 // 1,222 = 42 (42 x 1,222 = 51,324; 43 x 1,222 = 52,546 > 52,427): x5.25.
        (32_768, 8, 1_222, 42, 42 / 8),
        # 128k: all full 8,455 // 4,096 = 2; grouped 4,096 + 198 = 4,294 pages,
        #   52,427 // 4,294 = 12 (12 x 4,294 = 51,528): x6.00.
        (131_072, 2, 4_294, 12, 12 / 2),
    ],
)
def test_gemma3_groups_against_every_layer_full(
    capsys, tmp_path, context, full_sequences, grouped_pages, grouped_sequences, gain
):
    argv = [*GEMMA3, "--context", str(context)]
    plan = plan_json(capsys, argv)
    g = plan["layer_groups"]
    assert plan["page_bytes_per_layer"] == 32_768 and plan["page_bytes"] == 2_031_616
    assert plan["usable_pages_per_device"] == 8_455
    assert plan["sequences_per_group"] == g["all_full_sequences_per_group"] == full_sequences
    assert (g["group_size"], g["padding_layer_slots"], g["page_bytes"]) == (10, 8, 327_680)
    assert g["usable_pages_per_device"] == 52_427
    rows = group_rows(plan)
    assert (rows["sliding"]["num_layers"], rows["sliding"]["kv_cache_groups"]) == (52, 6)
    assert rows["sliding"]["pages_per_request_each"] == 33
    assert rows["full"]["pages_per_request"] == context // 32
    assert g["pages_per_request"] == grouped_pages
    assert g["sequences_per_group"] == grouped_sequences
    assert g["tokens_total"] == grouped_sequences * context
    assert g["all_full_tokens_total"] == full_sequences * context
    assert g["capacity_gain"] == pytest.approx(gain)
    code, out, _ = run(capsys, argv)
    assert code == 0
    assert re.search(rf"concurrent sequences of {context:,} tokens +{grouped_sequences} ", out)
    assert re.search(rf"  every layer full +{full_sequences} ", out)
    assert re.search(rf"capacity gain of the groups +x{gain:.2f}", out)
    assert re.search(r"sliding window 1,024: 52 layers +198 +pages per request: 6 KV", out)
    # --config on the same config.json gives the same plan.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset_config("gemma-3-27b")))
    from_config = plan_json(capsys, ["plan", "--config", str(path), *argv[3:]])
    assert {**from_config, "model": None} == {**plan, "model": None}


def test_gpt_oss_groups_and_lane_padding_at_32k(capsys):
    # gpt-oss-20b: 24 layers (12 sliding, window 128; 12 full), 8 KV heads, head_dim 64
    # stored in 128 lanes, bfloat16. On 1x8: 1 head = 2 rows per device; one layer's page is
    # 32 x 2 x 128 x 2 B = 16,384 bytes, of which 32 x 2 x 64 x 2 = 8,192 are lane padding.
    # Every layer full: 24 x 16,384 = 393,216 bytes a page id, 17,179,869,184 // 393,216 =
    #   43,690 pages, 43,689 usable; 1,024 pages a request: 43,689 // 1,024 = 42 sequences.
    # Grouped: 12 and 12 layers -> groups of 12, no padding: 196,608 bytes a page id, 87,381
    #   pages, 87,380 usable; a request holds 1,024 + (ceil(127 / 32) + 1 = 5) = 1,029 pages:
    #   87,380 // 1,029 = 84 sequences (84 x 1,029 = 86,436): x2.00.
    argv = ["plan", "--model", "gpt-oss-20b", "--mesh", "1x8", "--hbm-per-device", "16GiB"]
    argv += ["--context", "32768", "--kv-layout", "interleaved"]
    plan = plan_json(capsys, argv)
    g = plan["layer_groups"]
    assert plan["page_bytes_per_layer"] == 16_384
    assert plan["lane_padding_bytes_per_page_layer"] == 8_192
    assert plan["lane_padding_bytes_per_page"] == 24 * 8_192
    assert plan["usable_pages_per_device"] == 43_689 and plan["sequences_per_group"] == 42
    assert (g["group_size"], g["padding_layer_slots"], g["page_bytes"]) == (12, 0, 196_608)
    assert g["usable_pages_per_device"] == 87_380
    assert group_rows(plan)["sliding"]["pages_per_request"] == 5
    assert g["pages_per_request"] == 1_029 and g["sequences_per_group"] == 84
    assert g["capacity_gain"] == pytest.approx(2.0)
    code, out, _ = run(capsys, argv)
    assert code == 0
    assert re.search(r"lane padding per page, 1 layer +8,192 +50\.00% of each page", out)
    assert re.search(r"capacity gain of the groups +x2\.00", out)
    assert re.search(r"  every layer full +42 ", out)
    # Packed (the default at head_dim 64): one K|V row of 128 lanes, no lane padding; but one
    # bfloat16 row a device pads to the sublane packing of 2 rows: the same 16,384 bytes.
    packed = plan_json(capsys, argv[:-2])
    assert packed["kv_layout"] == "packed" and packed["lane_padding_bytes_per_page_layer"] == 0
    assert packed["padding_bytes_per_page_layer"] == 8_192
    assert packed["page_bytes_per_layer"] == 16_384
    assert packed["interleaved"]["saved_bytes_per_page"] == 0


def test_head_dim_64_config_plans_no_padding_bytes(capsys, tmp_path):
    # Qwen2.5-0.5B: 24 layers, 2 KV heads, head_dim 64, bfloat16; on 1x1 both heads a device,
    # packed: a layer's page is 32 x 2 rows x 128 lanes x 2 B = 16,384 bytes, all K and V;
    # interleaved: 32 x 4 x 128 x 2 = 32,768, half of it lanes 64..127. 4 GiB //
    # (24 x 16,384) = 10,922 page ids (10,921 usable) against 5,461 (5,460).
    path = tmp_path / "config.json"
    path.write_text(json.dumps(preset_config("qwen2.5-0.5b")))
    argv = ["plan", "--config", str(path), "--hbm-per-device", "4GiB"]
    plan = plan_json(capsys, argv)
    assert plan["kv_layout"] == "packed" and plan["page_bytes_per_layer"] == 16_384
    assert plan["padding_bytes_per_page_layer"] == 0
    assert plan["waste_bytes"]["head_dim_padding"] == plan["waste_bytes"]["dtype_packing"] == 0
    assert plan["usable_pages_per_device"] == 10_921
    w = plan["interleaved"]
    assert w["page_bytes"] == 24 * 32_768 and w["saved_bytes_per_page"] == 24 * 16_384
    assert w["tokens_per_group"] == 5_460 * 32
    code, out, _ = run(capsys, argv)
    assert code == 0
    assert re.search(r"padding bytes per page, 1 layer +0 +interleaved .*16,384 of 32,768", out)
    assert re.search(r"saved per page, 24 layers +393,216 +786,432 -> 393,216 bytes; x2\.00", out)
    assert re.search(r"row padding \(K\|V 128 -> 128 lanes\) +0 ", out)
    assert "lane padding per page" not in out
    wide = plan_json(capsys, [*argv, "--kv-layout", "interleaved"])
    assert wide["lane_padding_bytes_per_page_layer"] == 16_384 and wide["interleaved"] is None


def test_overrides_drop_the_layer_types_with_a_note(capsys):
    windowed = plan_json(capsys, [*GEMMA3, "--sliding-window", "512"])
    assert windowed["layer_groups"] is None and windowed["sliding_window"]["window"] == 512
    assert windowed["notes"] == [
        "sliding_window 1024 on 52 of 62 layers, full attention on 10: no one window serves "
        "every layer; layer_types has each layer's type; layer types not used: "
        "--sliding-window sets every layer's window"
    ]
    fewer = plan_json(capsys, [*GEMMA3, "--layers", "12"])
    assert fewer["layer_groups"] is None and fewer["sliding_window"] is None
    assert fewer["notes"][0].endswith("--layers 12 is not the config's 62 layers")
    same = plan_json(capsys, [*GEMMA3, "--layers", "62"])
    assert same["layer_groups"] is not None and same["notes"] == []


def test_chunked_llama4_groups(capsys):
    # Llama 4 Scout: 48 layers, 36 chunked (8192) and 12 full; 8 KV heads, head_dim 128. On
    # 1x8 one layer's page is 32 x 2 x 128 x 2 = 16,384 bytes. Groups of 12: 196,608 bytes a
    # page id, 87,381 pages, 87,380 usable; at 128k a request holds 3 x 256 + 4,096 = 4,864
    # pages: 87,380 // 4,864 = 17; every layer full 48 x 16,384 = 786,432 bytes a page id,
    # 21,845 pages, 21,844 usable // 4,096 = 5.
    argv = ["plan", "--model", "llama-4-scout", "--mesh", "1x8", "--hbm-per-device", "16GiB"]
    plan = plan_json(capsys, [*argv, "--context", "131072"])
    g = plan["layer_groups"]
    assert group_rows(plan)["chunked"]["pages_per_request"] == 3 * 256
    assert g["pages_per_request"] == 4_864 and g["sequences_per_group"] == 17
    assert g["all_full_sequences_per_group"] == 5


@pytest.mark.parametrize("source", ["preset", "config"])
def test_latent_plan_of_an_mla_model(capsys, tmp_path, source):
    """DeepSeek-V3 by preset and by config.json: the latent's bytes per token and the cost of
    replicating it over the 4-way head axis, against a data axis that holds no copies."""
    flags = ["--hbm-per-device", "4GiB", "--context", "4096"]
    where = ["--model", "deepseek-v3"]
    if source == "config":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(preset_config("deepseek-v3")))
        where = ["--config", str(path)]
    tp = plan_json(capsys, ["plan", *where, "--mesh", "1x4", *flags])
    dp = plan_json(capsys, ["plan", *where, "--mesh", "4x1", *flags])
    assert tp["kv_layout"] == dp["kv_layout"] == "latent"
    # bf16 row of 640 lanes, padded to 2 sublane rows: 2,560 bytes a token and layer.
    for p in (tp, dp):
        assert p["latent"]["bytes_per_token"] == 61 * 576 * 2
        assert p["latent"]["stored_bytes_per_token_per_device"] == 61 * 2560
    assert tp["latent"]["replication_bytes_per_token"] == 3 * 61 * 2560
    assert dp["latent"]["replication_bytes_per_token"] == 0
    assert dp["tokens_total"] == 4 * tp["tokens_total"]
    code, out, err = run(capsys, ["plan", *where, "--mesh", "1x4", *flags])
    assert code == 0, err
    assert "MLA latent 512 + rope 64" in out and "replication cost per token" in out
