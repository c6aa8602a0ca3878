import glob
import os
import subprocess
import sys

import pytest
import torch

import zoo
from zoo.graphs.compile_config import (CONFIG_DIR, CompileConfigError, default_config_path, load_compile_config,
                                       parse_compile_config)


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return str(path)


def test_every_shipped_config_is_valid():
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(CONFIG_DIR, "*.toml")))
    assert files == [f"{fam}.{dev}.toml" for fam in ("llama", "qwen") for dev in ("cpu", "cuda", "npu")]
    for f in files:
        load_compile_config(os.path.join(CONFIG_DIR, f))


def test_cpu_defaults_and_dtype_specific_options():
    cpu = load_compile_config(default_config_path("qwen", "cpu"))
    assert cpu.backend == "inductor"
    assert cpu.inductor_options(torch.float32) == {"cpp_wrapper": True}
    assert cpu.inductor_options(torch.bfloat16) == {"cpp_wrapper": True}  # no freezing: it slows warm starts
    c = parse_compile_config({"inductor": {"cpp_wrapper": True, "bfloat16": {"freezing": True}}}, "x.toml")
    assert c.inductor_options(torch.float32) == {"cpp_wrapper": True}
    assert c.inductor_options(torch.bfloat16) == {"cpp_wrapper": True, "freezing": True}
    cuda = load_compile_config(default_config_path("llama", "cuda"))
    assert cuda.inductor_options(torch.float32)["triton.cudagraphs"] is True  # reduce-overhead = CUDA graphs
    npu = load_compile_config(default_config_path("llama", "npu"))
    assert npu.backend == "torchair" and npu.torchair["frozen_parameter"] is True


def test_buckets_are_cut_at_and_extended_to_the_maxima(tmp_path):
    c = load_compile_config(write(tmp_path, "[buckets]\nbatch_sizes = [1, 4, 16]\nprefill_lens = [64, 128]\n"))
    b = c.buckets(max_batch_size=8, max_seq_len=100)
    assert (b.batch_sizes, b.prefill_lens, b.context_lens) == ((1, 4, 8), (64, 100), ())  # no contexts: whole cache
    c = load_compile_config(write(tmp_path, "[buckets]\ncontext_lens = [32, 256, 4096]\n"))
    b = c.buckets(max_batch_size=8, max_seq_len=1000)
    assert b.context_lens == (32, 256, 1000) and b.context_len_for(33) == 256 and b.context_len_for(999) == 1000


def test_dynamic_lengths_and_the_prefill_token_cap(tmp_path):
    cpu = load_compile_config(default_config_path("llama", "cpu")).buckets(max_batch_size=8, max_seq_len=2048)
    assert cpu.dynamic_lengths and cpu.length_multiple == 32 and cpu.prefill_tokens == 2048
    assert cpu.prefill_graphs() == [(b, None, None) for b in (1, 2, 4, 8)] and cpu.num_graphs == 8
    assert [cpu.prefill_len_for(n) for n in (1, 32, 33, 2000, 2048)] == [32, 32, 64, 2016, 2048]
    assert [cpu.context_len_for(n) for n in (5, 300)] == [32, 320]
    assert cpu.prefill_fits(1, 2048) and cpu.prefill_fits(8, 256) and not cpu.prefill_fits(8, 257)
    # a short max_seq_len gets a smaller multiple; the batch buckets are cut as usual
    short = load_compile_config(default_config_path("qwen", "cpu")).buckets(max_batch_size=2, max_seq_len=40)
    assert (short.batch_sizes, short.length_multiple, short.prefill_len_for(21)) == ((1, 2), 20, 40)
    assert cpu.chunk_tokens == 2048  # a prompt of max_seq_len runs in one call
    # static buckets under a token cap: only the (batch, length) graphs that fit; longer prompts are
    # prefilled in chunks of the longest length bucket within the cap
    c = load_compile_config(write(tmp_path, "[buckets]\nbatch_sizes = [1, 4]\nprefill_lens = [32, 128]\n"
                                            "prefill_tokens = 128\n"))
    b = c.buckets(max_batch_size=4, max_seq_len=256)
    assert b.chunk_tokens == 128
    assert b.prefill_graphs() == [(1, 32, None), (4, 32, None), (1, 128, None)]
    # with context buckets, a prefill graph per context bucket that holds its length
    c = load_compile_config(write(tmp_path, "[buckets]\nbatch_sizes = [1]\nprefill_lens = [32, 128]\n"
                                            "context_lens = [64, 256]\n"))
    b = c.buckets(max_batch_size=1, max_seq_len=256)
    assert b.prefill_graphs() == [(1, 32, 64), (1, 32, 256), (1, 128, 256), (1, 256, 256)]


@pytest.mark.parametrize("text, message", [
    ("backend = 'inductor'\nspeed = 'max'\n", r"key 'speed' is not a compile-config key"),
    ("backend = 'tvm'\n", r"key 'backend' must be one of"),
    ("mode = 'fast'\n", r"key 'mode' must be one of"),
    ("[inductor]\nnot_an_option = 1\n", r"key 'inductor.not_an_option' is not a torch._inductor.config option"),
    ("[inductor]\ncpp_wrapper = 'yes'\n", r"key 'inductor.cpp_wrapper' must be true or false"),
    ("[inductor.bfloat16]\nfreezin = true\n", r"key 'inductor.bfloat16.freezin' is not a torch._inductor.config option"),
    ("[buckets]\nbatch_sizes = [4, 2]\n", r"key 'buckets.batch_sizes' must be a non-empty increasing list"),
    ("[buckets]\nseq = [4]\n", r"key 'buckets.seq' is not a bucket key"),
    ("backend = 'torchair'\n[buckets]\ncontext_lens = [256]\n", r"'buckets.context_lens' is not supported by the torchair"),
    ("[torchair]\nfrozen = true\n", r"\[torchair\] unknown torchair option 'frozen'"),
    ("[torchair]\nfrozen_parameter = 1\n", r"\[torchair\] torchair option 'frozen_parameter' must be bool"),
    ("[torchair]\nmode = 'max-autotune'\nstatic_kernel_compile = true\n", r"only takes effect with mode"),
    ("graph_cache = 'yes'\n", r"key 'graph_cache' must be true or false"),
    ("regional = 1\n", r"key 'regional' must be true or false"),
    ("backend = 'torchair'\nregional = true\n", r"key 'regional' is an inductor option"),
    ("regional = true\n[inductor.bfloat16]\ncpp_wrapper = true\n", r"key 'regional' cannot be combined with"),
    ("[buckets]\ndynamic_lengths = 1\n", r"key 'buckets.dynamic_lengths' must be true or false"),
    ("[buckets]\nprefill_tokens = 0\n", r"key 'buckets.prefill_tokens' must be a positive int"),
    ("[buckets]\nlength_multiple = 16\n", r"key 'buckets.length_multiple' needs dynamic_lengths = true"),
    ("[buckets]\ndynamic_lengths = true\nprefill_lens = [32]\n", r"'buckets.prefill_lens' cannot be combined"),
    ("mode = 'reduce-overhead'\n[buckets]\ndynamic_lengths = true\n", r"CUDA graphs record one graph per"),
    ("backend = 'torchair'\n[buckets]\ndynamic_lengths = true\n", r"'buckets.dynamic_lengths' is an inductor"),
    ("backend = \n", r"not valid TOML"),
])
def test_bad_configs_name_the_key_and_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(CompileConfigError, match=message) as err:
        load_compile_config(path)
    assert path in str(err.value)


def test_load_uses_the_given_config(checkpoint, tmp_path):
    path = write(tmp_path, "[buckets]\nbatch_sizes = [1]\nprefill_lens = [16]\n[inductor]\ncpp_wrapper = false\n")
    model = zoo.load(checkpoint("llama2"), compile_config=path, max_batch_size=2, max_seq_len=32)
    buckets = model.engine.runner.buckets
    assert (buckets.batch_sizes, buckets.prefill_lens) == ((1, 2), (16, 32))


def test_cli_rejects_a_bad_config(tmp_path):
    path = write(tmp_path, "[inductor]\nbogus = 1\n")
    run = subprocess.run([sys.executable, "-m", "zoo.llama.infer", "--compiled", "--compile-config", path],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "key 'inductor.bogus'" in run.stderr and path in run.stderr


def test_a_backend_on_the_wrong_device_is_refused(checkpoint):
    npu_config = default_config_path("llama", "npu")
    with pytest.raises(ValueError, match=r"backend 'torchair' does not run on device 'cpu'"):
        zoo.load(checkpoint("llama2"), compiled=True, compile_config=npu_config)
