"""Peer: Unsloth LoRA/QLoRA training throughput on one GPU (issue #14), the same shapes and loop
as bench/baseline_peft.py: random-init Llama shapes saved to disk, seq 2048, full rows, fused
AdamW, LoRA r 16 α 32 on all seven projections, dropout 0. One JSON line per case.

Started from ../shared/bench/peer_unsloth.py (the script behind the issue's Unsloth figures);
added here:
- gradient accumulation (ACCUM micro-batches of BS rows per optimizer step), so the "fastest"
  8B row runs at 2 × 2 like loraflow's;
- a read-back of what `FastLanguageModel.for_training()` left switched on: the checkpointing
  mode Unsloth recorded, the decoder layers whose checkpointing flag is on with a checkpoint
  function installed, whether its offloading checkpoint function is the one installed — and,
  at an extra untimed step, how many decoder layers ran their forward more often than the
  step's micro-batches ask (a recomputation in the backward is what checkpointing is);
- the gradient norm of one step, the trainable-parameter count and `trains` on every row;
- `varlen`: the variable-length set of bench/train_throughput.py (64 examples, log-normal
  lengths, seed 0) through Unsloth's padding-free path: each micro-batch concatenated into one
  row with position_ids restarting per example and no attention mask, from which Unsloth's
  Llama forward infers the packed sequence lengths (what TRL's padding_free sends it), plus a
  check that the packed loss equals the examples' separate losses.

usage: python3 peer_unsloth.py CASE...
  CASE = SHAPE:QUANT:BS:CKPT[:ACCUM]   e.g. llama-8b:nf4:4:unsloth  llama-8b:bf16:2:false:2
         SHAPE llama-1b|llama-8b, QUANT bf16|nf4|fp8, CKPT false|true|unsloth (offloaded)
       varlen:bf16:MICRO:CKPT        e.g. varlen:bf16:32:false (64 examples per step)
env: PEER_ROOT (saved models; default $TMPDIR/bl, where baseline_peft.py saves its 8B copy),
     PEAK_TFLOPS (989), LEARN=1 (50 steps of the learnable task after the timed steps).
"""
import gc
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import unsloth  # noqa: E402  (must come before transformers: it patches it)
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline_peft import SHAPES, flops_per_token  # noqa: E402

PEAK = float(os.environ.get("PEAK_TFLOPS", "989"))
ROOT = os.environ.get("PEER_ROOT", os.path.join(tempfile.gettempdir(), "bl"))
SEQ, WARM, STEPS = 2048, 3, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save(shape, root=ROOT):
    """The random model under root/shape (reused when there: baseline_peft.py saves its 8B copy
    there without a tokenizer), plus a word-level tokenizer Unsloth's loader can read."""
    path = os.path.join(root, shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
        torch.manual_seed(0)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            m = LlamaForCausalLM(cfg)
            torch.set_default_dtype(torch.float32)
        m.save_pretrained(path)
        del m
        gc.collect()
        torch.cuda.empty_cache()
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        tok = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>", pad_token="</s>").save_pretrained(path)
    return path


def load(shape, quant, ckpt, seq=SEQ):
    path = save(shape)
    torch.manual_seed(0)
    t = time.time()
    m, _ = FastLanguageModel.from_pretrained(path, max_seq_length=seq, dtype=torch.bfloat16,
                                             load_in_4bit=(quant == "nf4"),
                                             load_in_16bit=(quant == "bf16"),
                                             load_in_fp8=(quant == "fp8"))
    load_s = time.time() - t
    asked = "unsloth" if ckpt == "unsloth" else (ckpt == "true")
    m = FastLanguageModel.get_peft_model(m, r=16, lora_alpha=32, lora_dropout=0, bias="none",
                                         target_modules=TARGETS, use_gradient_checkpointing=asked)
    # As the runs called it (no argument): what it turns on is read back below.
    FastLanguageModel.for_training(m)
    return m, load_s, asked


def checkpointing_state(m) -> dict:
    """What for_training() left on, from the flags (no forward needed)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [x for x in m.modules() if isinstance(x, GradientCheckpointingLayer)]
    armed = [x for x in layers if x.gradient_checkpointing
             and getattr(x, "_gradient_checkpointing_func", None) is not None]
    funcs = sorted({repr(getattr(x, "_gradient_checkpointing_func", None))[:120] for x in armed})
    backbone = [x for x in m.modules() if type(x).__name__ == "LlamaModel"]
    cf = torch.utils.checkpoint.CheckpointFunction
    return {"recorded_mode": repr(getattr(m, "_unsloth_gradient_checkpointing", None)),
            "backbone_flag": bool(backbone and backbone[0].gradient_checkpointing),
            "layers": len(layers), "layers_flagged": len(armed), "ckpt_funcs": funcs,
            # Unsloth's smart offloading replaces torch's CheckpointFunction.
            "checkpoint_function": f"{cf.__module__}.{cf.__qualname__}"}


def recomputed_layers(m, run_step, forwards: int) -> int | None:
    """How many decoder layers run their forward more often than the step's `forwards`
    micro-batches ask: a checkpointed layer runs it again in the backward. Counted with
    forward pre-hooks at an untimed step (hooks can make a compiled layer recompile, so
    never at a timed one)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [x for x in m.modules() if isinstance(x, GradientCheckpointingLayer)]
    if not layers:
        return None
    calls = [0] * len(layers)
    handles = [layer.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(
        i, calls[i] + 1)) for i, layer in enumerate(layers)]
    try:
        run_step()
    finally:
        for h in handles:
            h.remove()
    return sum(1 for c in calls if c > forwards)


def grad_stats(m):
    gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in m.parameters()
                           if p.grad is not None)).item()
    return gnorm, sum(p.numel() for p in m.parameters() if p.requires_grad)


def timed_loop(m, opt, micro_batches, steps=STEPS, warm=WARM):
    """Each step: forward + backward over every micro-batch (loss / count), then the
    optimizer. Returns the median step time after the warm-up and the last loss."""
    times, loss = [], None
    for _ in range(warm + steps):
        t = time.time()
        for kw in micro_batches:
            loss = m(**kw).loss
            (loss / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - t)
    timed = sorted(times[warm:])
    return timed[len(timed) // 2], loss


def probe_step(m, micro_batches):
    """One untimed step without the optimizer: gradient norm, recomputed layers."""
    def step():
        for kw in micro_batches:
            (m(**kw).loss / len(micro_batches)).backward()
    try:
        recomputed = recomputed_layers(m, step, len(micro_batches))
    except Exception as exc:  # the probe must not hide the row
        recomputed = f"probe failed: {exc!r}"[:200]
        m.zero_grad(set_to_none=True)
        step()
    gnorm, ntrain = grad_stats(m)
    m.zero_grad(set_to_none=True)
    return gnorm, ntrain, recomputed


def run(shape, quant, bs, ckpt, accum=1, seq=SEQ):
    m, load_s, asked = load(shape, quant, ckpt, seq)
    state = checkpointing_state(m)
    cfg = m.config
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    micro = []
    for _ in range(accum):
        x = torch.randint(3, cfg.vocab_size, (bs, seq), device="cuda", generator=gen)
        micro.append({"input_ids": x, "labels": x})
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step, loss = timed_loop(m, opt, micro)
    peak = torch.cuda.max_memory_allocated() / 2**30
    gnorm, ntrain, recomputed = probe_step(m, micro)
    learn = learnable(m, opt, bs, seq) if os.environ.get("LEARN") else None
    tps = bs * accum * seq / step
    tf = flops_per_token(cfg, seq) * tps / 1e12
    res = dict(peer="unsloth", version=unsloth.__version__, shape=shape, quant=quant, seq=seq,
               bs=bs, accum=accum, global_batch=bs * accum, ckpt_asked=repr(asked),
               step_s=round(step, 4), tokens_per_s=round(tps), model_tflops=round(tf, 1),
               mfu=round(tf / PEAK, 3), peak_mem_gib=round(peak, 2), load_s=round(load_s, 1),
               loss=round(loss.item(), 3), grad_norm=round(gnorm, 4), trainable=ntrain,
               ckpt_layers_recomputed=recomputed,
               offload=("Unsloth" in state["checkpoint_function"] and state["layers_flagged"] > 0),
               trains=bool(gnorm > 0 and math.isfinite(gnorm) and math.isfinite(loss.item())),
               **{f"after_for_training_{k}": v for k, v in state.items()}, learn=learn)
    print(json.dumps(res), flush=True)
    del m, opt, micro
    gc.collect()
    torch.cuda.empty_cache()
    return res


def learnable(m, opt, bs, seq):
    """One random order of 16 ids, repeated; 50 steps, gradient norm clipped at 1."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randperm(1000, generator=g)[:16] + 3
    y = ids.repeat(seq // 16 + 1)[:seq].unsqueeze(0).repeat(bs, 1).cuda()
    losses = []
    for _ in range(50):
        o = m(input_ids=y, labels=y)
        o.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(o.loss.item(), 4))
    return [losses[0], losses[9], losses[24], losses[-1]]


def varlen_set(count=64, seed=0):
    """bench/train_throughput.py's variable-length set (varlen_lengths, random_rows), rebuilt
    here because that module imports loraflow's stack, which this bundle lacks."""
    import numpy as np

    sigma = math.log(1024 / 256) / 1.6449
    lengths = [int(min(SEQ, max(2, round(x))))
               for x in np.random.RandomState(seed).lognormal(math.log(256), sigma, count)]
    rows = np.random.RandomState(seed).randint(0, 128256, size=(count, SEQ)).tolist()
    return [r[:n] for r, n in zip(rows, lengths)]


def padding_free(examples):
    """One row: the examples concatenated, position_ids restarting at each, the first label
    of each -100 (never learn an example's first token from the one before)."""
    ids, pos, labels = [], [], []
    for e in examples:
        ids += e
        pos += list(range(len(e)))
        labels += [-100] + e[1:]
    t = lambda v: torch.tensor([v], device="cuda")  # noqa: E731
    return {"input_ids": t(ids), "position_ids": t(pos), "labels": t(labels)}


def packed_matches_separate(m, examples) -> float:
    """Relative difference between the loss of the examples packed into one row and the
    token-weighted mean of their separate losses: near 0 only if attention stays inside
    each example (block-diagonal), i.e. the padding-free path is really taken."""
    with torch.no_grad():
        packed = m(**padding_free(examples)).loss.float().item()
        total = weight = 0.0
        for e in examples:
            loss = m(**padding_free([e])).loss.float().item()
            total += loss * (len(e) - 1)
            weight += len(e) - 1
    return abs(packed - total / weight) / abs(total / weight)


def run_varlen(micro, ckpt, shape="llama-1b", quant="bf16"):
    m, load_s, asked = load(shape, quant, ckpt)
    state = checkpointing_state(m)
    cfg = m.config
    examples = varlen_set()
    lengths = [len(e) for e in examples]
    batches = [padding_free(examples[i:i + micro]) for i in range(0, len(examples), micro)]
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step, loss = timed_loop(m, opt, batches)
    peak = torch.cuda.max_memory_allocated() / 2**30
    gnorm, ntrain, recomputed = probe_step(m, batches)
    try:
        check = round(packed_matches_separate(m, examples[:3]), 5)
    except Exception as exc:
        check = f"check failed: {exc!r}"[:200]
    mean_len = round(sum(lengths) / len(lengths))
    tps = sum(lengths) / step
    tf = flops_per_token(cfg, mean_len) * tps / 1e12
    res = dict(peer="unsloth", version=unsloth.__version__, shape="llama-1b-varlen", quant=quant,
               path="padding-free", examples=len(lengths), mean_length=mean_len,
               micro_batch=micro, rows_per_step=len(batches), ckpt_asked=repr(asked),
               step_s=round(step, 4), tokens_per_s=round(tps), model_tflops=round(tf, 1),
               mfu=round(tf / PEAK, 3), peak_mem_gib=round(peak, 2), load_s=round(load_s, 1),
               loss=round(loss.item(), 3), grad_norm=round(gnorm, 4), trainable=ntrain,
               ckpt_layers_recomputed=recomputed,
               offload=("Unsloth" in state["checkpoint_function"] and state["layers_flagged"] > 0),
               packed_vs_separate_rel_diff=check,
               trains=bool(gnorm > 0 and math.isfinite(gnorm) and math.isfinite(loss.item())),
               **{f"after_for_training_{k}": v for k, v in state.items()})
    print(json.dumps(res), flush=True)
    del m, opt, batches
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(cases):
    for c in cases:
        parts = c.split(":")
        try:
            if parts[0] == "varlen":
                run_varlen(int(parts[2]), parts[3])
            else:
                shape, quant, bs, ckpt = parts[:4]
                run(shape, quant, int(bs), ckpt, int(parts[4]) if len(parts) > 4 else 1)
        except Exception as e:  # one failing case must not hide the others
            import traceback

            traceback.print_exc()
            print(json.dumps({"peer": "unsloth", "case": c, "error": repr(e)[:800],
                              "trains": False}), flush=True)
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
