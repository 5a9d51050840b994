"""One of bench.py's measurements, in a fresh process of its own (its own graph compilation and peak memory):

    python -m qatcifar.measure qat --data DIR --checkpoint OUT.ckpt --batch 32 --steps 8

Kinds: `float`, `qat`, `lsq`, `fgsm`, `pgd` time train.py's training step (float32, QAT with min/max
observers, QAT with learned step sizes, QAT with adversarial training) and save the network; `eval`
times eval.py's forward pass and the int8 reference on such a checkpoint; `attack` times eval.py's
attacks on it. Prints one JSON line.
"""
import json
import statistics
import time

from qatcifar import cli, interrupts  # first: cli quiets MindSpore's log before it loads

# isort: split
from qatcifar import adversarial, attacks, checkpoint, cifar, inference, int8, int8_export, networks, training
from qatcifar.latency import peak_rss_mb

EVAL_BATCH = 100


def train_worker(args):
    """Time train.py's training step on one fixed batch: the first step (graph compilation), then --steps."""
    device = cli.setup_device(args.device)
    flags = ["--device", device, "--no-qat" if args.kind == "float" else "--qat",
             "--arch", args.arch]
    if args.kind == "lsq":
        flags += ["--quantizer", "lsq"]
    if args.kind in ("fgsm", "pgd"):
        flags += ["--adv_train", args.kind] + (["--adv_steps", str(args.adv_steps)] if args.kind == "pgd" else [])
    train_args = training.settings(flags)
    train_args.batchsize = args.batch
    adversarial.resolve(train_args)
    dataset = cifar.create_dataset(args.data, training=True, batch_size=args.batch, num_samples=args.batch)
    images, labels = next(dataset.create_tuple_iterator(num_epochs=1))
    start = time.perf_counter()
    net = training.build_network(train_args, steps_per_epoch=1)
    step = training.build_train_network(net, training.make_optimizer(net, train_args, steps_per_epoch=1), train_args)
    step.set_train()
    step(images, labels).asnumpy()
    first_step_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(images, labels).asnumpy()
        times.append(time.perf_counter() - start)
    checkpoint.save(net, args.checkpoint, {})
    return {"device": device, "first_step_s": first_step_s, "step_s": times, "peak_rss_mb": peak_rss_mb()}


def eval_worker(args):
    """Images/s of eval.py's forward pass on a checkpoint, and of the int8 reference of its export."""
    cli.setup_device(args.device)
    model = inference.load_model(args.checkpoint)
    dataset = cifar.create_dataset(args.data, training=False, batch_size=EVAL_BATCH, num_samples=args.eval_images)
    inference.predict(model, dataset)  # warm-up: graph compilation
    eval_ips = statistics.median(timed_ips(model, dataset) for _ in range(3))
    int8_path = args.checkpoint + ".npz"
    net, config = checkpoint.load_network(args.checkpoint, cifar.NUM_CLASSES)
    int8.save(int8_path, *int8_export.int8_model(net, config))
    int8_model = inference.load_model(int8_path)
    small = cifar.create_dataset(args.data, training=False, batch_size=EVAL_BATCH, num_samples=args.int8_images)
    return {"eval_ips": eval_ips, "int8_ips": timed_ips(int8_model, small)}


def timed_ips(model, dataset):
    start = time.perf_counter()
    predictions, _ = inference.predict(model, dataset)
    return len(predictions) / (time.perf_counter() - start)


def attack_worker(args):
    """Seconds per image of the clean forward pass, FGSM, PGD-10, APGD-CE-100 and 100 queries of Square on a
    checkpoint, as eval.py --attack runs them (batch 100), each after a warm-up batch that compiles its graph."""
    from qatcifar.attack_apgd import APGD
    from qatcifar.attack_square import Square

    cli.setup_device(args.device)
    net = inference.load_model(args.checkpoint).network
    dataset = cifar.create_dataset(args.data, training=False, batch_size=EVAL_BATCH,
                                        num_samples=args.attack_images)
    images, labels = next(dataset.create_tuple_iterator(num_epochs=1, output_numpy=True))
    inference.predict(net, dataset)  # warm-up: graph compilation
    seconds = {"clean": timed(lambda: inference.predict(net, dataset))}
    for method in ("fgsm", "pgd"):
        attack = attacks.Attack(net, method, eps=8 / 255, steps=10)
        attack(images, labels)  # warm-up: graph compilation
        seconds[method] = timed(lambda: attacks.evaluate(attack, dataset))  # noqa: B023 (called at once)
    # APGD-CE-100, and 100 queries of Square, at eps 0 where nothing breaks: every image takes the whole budget
    for name, attack in (("apgd_ce", APGD(net, 0.0, steps=100)), ("square_100", Square(attacks.Attack(
            net, "fgsm", 0.0).logits, 1e-6, queries=100))):
        attack(images[:2], labels[:2])  # warm-up: graph compilation
        seconds[name] = timed(lambda: attacks.evaluate(attack, dataset))  # noqa: B023 (called at once)
    return {f"{name}_s_per_image": s / args.attack_images for name, s in seconds.items()}


def timed(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


KINDS = {"float": train_worker, "qat": train_worker, "lsq": train_worker, "fgsm": train_worker, "pgd": train_worker,
         "eval": eval_worker, "attack": attack_worker}


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m qatcifar.measure", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--data", required=True, help="a CIFAR-10 folder (bench.py's synthetic one)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint to write (training) or to read")
    parser.add_argument("--arch", choices=sorted(networks.ARCHS), default=networks.DEFAULT_ARCH)
    cli.add_device_argument(parser, help="device to run on")
    parser.add_argument("--batch", type=cli.positive_int, default=32, help="training batch size")
    parser.add_argument("--steps", type=cli.positive_int, default=8, help="timed training steps")
    parser.add_argument("--eval_images", type=cli.positive_int, default=500, help="images per evaluation pass")
    parser.add_argument("--int8_images", type=cli.positive_int, default=200, help="images for the int8 reference")
    parser.add_argument("--adv_steps", type=cli.positive_int, default=adversarial.DEFAULT_PGD_STEPS,
                        help="k of the PGD-k training step")
    parser.add_argument("--attack_images", type=cli.positive_int, default=100, help="images per attack measurement")
    args = parser.parse_args(argv)
    interrupts.run(measure, args, interrupted="no figures")


def measure(args):
    print(json.dumps(KINDS[args.kind](args)), flush=True)


if __name__ == "__main__":
    interrupts.block()  # (before MindSpore starts threads)
    main()
