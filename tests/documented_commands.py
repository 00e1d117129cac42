"""How the tests run each shell command that README.md and docs/ show, at a small size.

Every command in a ``bash`` block of those files must have an entry here (the test fails
on one that has none, and on an entry no document shows). An entry runs the documented
command itself: only the listed replacements are made (each must occur in it) and the
listed arguments are appended; an appended option overrides the documented one, as
argparse keeps the last. ``{tmp}`` is a folder of the document's own, shared by its
commands in the order they appear (a run the first writes is what the next evaluates);
``{imagefolder}`` a tiny ImageNet-style folder, ``{image}`` a PNG, ``{deit_s_weights}``
a safetensors file of DeiT-S weights.

``CI_COMMANDS`` are not run here: ``.ci/run`` runs them, and a test checks that it does.
``RUN_ELSEWHERE`` names, per test module, the documented commands that module runs itself
(checking more than the exit status); each must appear verbatim among its string constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Small:
    """The documented command with ``replace`` applied and ``append`` added."""

    replace: dict[str, str] = field(default_factory=dict)
    append: str = ""


PIP_DRY_RUN = "python3 -m pip install --dry-run --no-build-isolation"
# A recipe's fine-tuning cut to one or two steps on a few images, written under {tmp}.
FASHION_MNIST_RUN = ("--set train.max_steps_per_epoch=2 --set train.batch_size=8 --set data.train_subset=16 "
                     "--set data.eval_subset=32 --set train.benchmark_batch_size=2")
DEIT_ON_TINY_IMAGES = ("--set model.pretrained=false --set model.kwargs.img_size=32 --set data.workers=0 "
                       "--set train.epochs=1 --set train.max_steps_per_epoch=1 --set train.batch_size=4 "
                       "--set train.eval_batch_size=8 --set train.benchmark_batch_size=2")
TINY_DEIT = """--model-kwargs '{"img_size": 32, "depth": 4}' --layers 1 2 3"""
QUICK_TIMING = "--repeats 1 --warmup 0 --calls-per-repeat 1 --batch-sizes 2"
SMALL_COMPARE = ("--steps 1 --repeats 1 --keep-rates 0.7 --methods unpatched evit --set data.train_subset=16 "
                 "--set data.eval_subset=32 --set train.batch_size=8")  # argparse checks the documented --methods too

QUICK_TUNE = "--images 12 --batch-size 4 --methods evit --keep-rates 0.7 --time-budget 60"

COMMANDS: dict[str, Small] = {
    # README.md
    # pip resolves and builds the package without installing it (--dry-run; the build backend as installed)
    "pip install .": Small({"pip install": PIP_DRY_RUN}),
    'pip install ".[prune,plot]"': Small({"pip install": PIP_DRY_RUN}),
    "python -m evit_patch.finetune recipes/deit_s.yaml --set data.root=/data/imagenet": Small(
        {"/data/imagenet": "{imagefolder}"}, f"{DEIT_ON_TINY_IMAGES} --set train.output_dir={{tmp}}/deit_s_single"),
    "torchrun --nproc_per_node 8 -m evit_patch.finetune recipes/deit_s.yaml --set data.root=/data/imagenet": Small(
        {"--nproc_per_node 8": "--nproc_per_node 2", "/data/imagenet": "{imagefolder}"},
        f"{DEIT_ON_TINY_IMAGES} --set train.output_dir={{tmp}}/deit_s"),
    "python -m evit_patch.evaluate runs/deit_s": Small({"runs/deit_s": "{tmp}/deit_s"}),
    "python3 -m evit_patch.finetune recipes/fashion_mnist.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.output_dir={{tmp}}/fashion_mnist"),
    # docs/finetuning.md
    "python -m evit_patch.finetune recipes/deit_s.yaml --dry-run --world-size 8": Small(),
    "python -m evit_patch.finetune recipes/fashion_mnist.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.output_dir={{tmp}}/fashion_mnist"),
    "python -m evit_patch.evaluate runs/fashion_mnist": Small({"runs/fashion_mnist": "{tmp}/fashion_mnist"}),
    "python -m evit_patch.visualize --run runs/fashion_mnist --fashion-mnist 0 1 2 3 --scale 8 --out kept.png": Small(
        {"runs/fashion_mnist": "{tmp}/fashion_mnist", "kept.png": "{tmp}/kept.png"}),
    # docs/usage.md
    "python -m evit_patch.visualize --model deit_small_patch16_224 --checkpoint weights.safetensors --layers 3 6 9 "
    "--keep-rate 0.7 --image photo.jpg --scale 2 --out kept.png": Small(
        {"weights.safetensors": "{deit_s_weights}", "photo.jpg": "{image}", "kept.png": "{tmp}/kept.png"}),
    "python -m evit_patch.tools.tune vit_tiny_patch16_224 --checkpoint recipes/checkpoints/fashion_mnist_vit.safetensors "
    "--model-arg img_size=28 --model-arg patch_size=2 --model-arg in_chans=1 --model-arg num_classes=10 "
    "--model-arg embed_dim=64 --model-arg depth=6 --model-arg num_heads=4 --model-arg mlp_ratio=2 --fashion-mnist "
    "--images 256 --batch-size 64 --out tune_fashion_mnist": Small(
        {"--out tune_fashion_mnist": "--out {tmp}/tune_fashion_mnist"}, QUICK_TUNE),
    "evit-tune deit_small_patch16_224 --pretrained --folder photos/ --batch-size 1 --max-agreement-loss 0.01 "
    "--out tune_deit_s": Small(  # the installed script may be another checkout's: the module, on a tiny DeiT
        {"evit-tune": "python -m evit_patch.tools.tune", "deit_small_patch16_224 --pretrained": "deit_tiny_patch16_224",
         "photos/": "{imagefolder}", "--max-agreement-loss 0.01": "--max-agreement-loss 1",
         "--out tune_deit_s": "--out {tmp}/tune_deit_s"},
        f"{QUICK_TUNE} --model-arg img_size=32 --model-arg depth=4"),
    # docs/measured.md
    "python benchmarks/throughput.py --batch-sizes 1 --keep-rates 0.7 --methods evit evit-no-fusion --bound "
    "--repeats 31 --calls-per-repeat 3 --threads 2": Small({}, f"{QUICK_TIMING} {TINY_DEIT}"),
    "python benchmarks/throughput.py --batch-sizes 32 --keep-rates 0.7 --methods evit evit-no-fusion --bound "
    "--repeats 9 --threads 2": Small({}, f"{QUICK_TIMING} {TINY_DEIT}"),
    "python benchmarks/throughput.py --train --batch-sizes 32 --keep-rates 0.7 --repeats 7 --threads 2": Small(
        {}, f"{QUICK_TIMING} {TINY_DEIT}"),
    """python benchmarks/throughput.py --models vit_tiny_patch16_224 --layers 1 3 4 --model-kwargs '{"img_size": 28, """
    """"patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 64, "depth": 6, "num_heads": 4, "mlp_ratio": 2}' """
    "--batch-sizes 64 1 --keep-rates 0.7 --methods evit evit-no-fusion --bound --repeats 31 --calls-per-repeat 5 "
    "--threads 2": Small({}, QUICK_TIMING),
    """python benchmarks/throughput.py --source transformers --models vit --batch-sizes 32 --keep-rates 0.7 --repeats 9 """
    """--threads 2 --model-kwargs '{"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, """
    """"intermediate_size": 1536, "image_size": 224, "patch_size": 16}'""": Small(
        {}, f"""{QUICK_TIMING} --model-kwargs '{{"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, """
            """"intermediate_size": 64, "image_size": 32, "patch_size": 8}' --layers 1 2 3"""),
    "python benchmarks/throughput.py --models deit_small_patch16_224 --batch-sizes 1 32 --keep-rates 0.7 --methods evit "
    "evit-no-fusion random tome evit-training-free dynamicvit --compile --with-eager --repeats 9 --threads 2 "
    "--out benchmarks/results/compiled_deit_s_cpu": Small(  # compiled in tests/test_compile.py and device_run --quick
        {"--compile --with-eager ": "", "benchmarks/results/compiled_deit_s_cpu": "{tmp}/compiled"},
        f"{QUICK_TIMING} {TINY_DEIT} --models deit_tiny_patch16_224"),
    "python benchmarks/throughput.py --models deit_small_patch16_224 --batch-sizes 1 32 --keep-rates 0.7 --methods evit "
    "random --repeats 9 --threads 2 --out benchmarks/results/random_drop_deit_s_cpu": Small(
        {"benchmarks/results/random_drop_deit_s_cpu": "{tmp}/random"}, f"{QUICK_TIMING} {TINY_DEIT} --models deit_tiny_patch16_224"),
    "python benchmarks/soak.py --threads 4 --calls 300 --out benchmarks/results/soak_cpu": Small(
        {"benchmarks/results/soak_cpu": "{tmp}/soak"},
        """--threads 2 --calls 6 --max-batch 2 --methods evit tome --layers 1 2 """
        """--model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2}'"""),
    # docs/baselines.md
    "python benchmarks/compare.py": Small({}, f"{SMALL_COMPARE} --out {{tmp}}/default"),
    "python benchmarks/compare.py --steps 150 600 1800 --methods unpatched evit tome width-pruning": Small(
        {}, f"{SMALL_COMPARE} --out {{tmp}}/budgets"),
    "python benchmarks/compare.py --recipe recipes/deit_s.yaml --set data.root=/data/imagenet --steps 5000": Small(
        {"/data/imagenet": "{imagefolder}"},
        f"{SMALL_COMPARE} --out {{tmp}}/deit_s --set model.pretrained=false --set model.kwargs.img_size=32 "
        "--set data.workers=0 --set train.batch_size=4 --set train.eval_batch_size=8"),
    "python -m evit_patch.finetune recipes/fashion_mnist.yaml --set structural.enabled=true "
    "--set train.output_dir=runs/fashion_mnist_width": Small(
        {"runs/fashion_mnist_width": "{tmp}/fashion_mnist_width"}, FASHION_MNIST_RUN),
    # docs/findings.md
    "python -m evit_patch.finetune recipes/fashion_mnist_pretrain.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.epochs=1 --set train.output_dir={{tmp}}/fashion_mnist_pretrain"),
    "python -m evit_patch.finetune recipes/fashion_mnist_pretrain.yaml --set model.kwargs.reg_tokens=4 "
    "--set train.output_dir=runs/fashion_mnist_pretrain_reg4": Small(
        {"runs/fashion_mnist_pretrain_reg4": "{tmp}/fashion_mnist_pretrain_reg4"},
        f"{FASHION_MNIST_RUN} --set train.epochs=1"),
    """python benchmarks/training_curves.py runs/fashion_mnist_pretrain runs/fashion_mnist_pretrain_reg4 --labels """
    """"no registers" "4 register tokens" --out benchmarks/results/fashion_mnist_base_training""": Small(
        {"runs/": "{tmp}/", "benchmarks/results/fashion_mnist_base_training": "{tmp}/training"}),
    "python benchmarks/compare.py --set model.checkpoint=runs/fashion_mnist_pretrain/model.safetensors --methods "
    "unpatched evit tome width-pruning --steps 150 600 --out benchmarks/results/budget_fashion_mnist": Small(
        {"runs/fashion_mnist_pretrain": "{tmp}/fashion_mnist_pretrain",
         "benchmarks/results/budget_fashion_mnist": "{tmp}/budget"}, SMALL_COMPARE),
    # docs/measured.md, the tuner against the paper's placement
    "python benchmarks/tune_against_paper.py --batch-size 64 --time-budget 300 --finetune "
    "--out benchmarks/results/tune_fashion_mnist_b64": Small(
        {"benchmarks/results/tune_fashion_mnist_b64": "{tmp}/tune_b64"},
        f"--images 16 --batch-size 4 --keep-rates 0.5 --time-budget 20 --repeats 1 --runs {{tmp}}/runs {FASHION_MNIST_RUN}"),
    "evit-tune deit_small_patch16_224 --fashion-mnist --images 256 --batch-size 1 --time-budget 480 "
    "--out benchmarks/results/tune_deit_s_cpu_b1": Small(  # the module, on a tiny DeiT
        {"evit-tune": "python -m evit_patch.tools.tune", "deit_small_patch16_224": "deit_tiny_patch16_224",
         "--images 256": "--images 12", "--out benchmarks/results/tune_deit_s_cpu_b1": "--out {tmp}/tune_deit_b1"},
        "--model-arg img_size=32 --model-arg depth=4 --methods evit --keep-rates 0.7 --time-budget 60"),
    # docs/positions.md
    "python -m evit_patch.finetune recipes/fashion_mnist_rotary_pretrain.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.output_dir={{tmp}}/rotary_pretrain"),
    "python benchmarks/training_free.py --recipe recipes/fashion_mnist_rotary.yaml --position-rules representative "
    "members top-member --out benchmarks/results/training_free_fashion_mnist_rotary": Small(
        {"benchmarks/results/training_free_fashion_mnist_rotary": "{tmp}/training_free_rotary"},
        "--set data.eval_subset=32 --keep-rates 0.5"),
    "python benchmarks/dense.py --recipe recipes/fashion_mnist_rotary.yaml "
    "--out benchmarks/results/dense_fashion_mnist_rotary": Small(
        {"benchmarks/results/dense_fashion_mnist_rotary": "{tmp}/dense_rotary"},
        "--train-images 64 --test-images 32 --epochs 1 --finetune-epochs 1 --keep-rates 0.7 --fills carry"),
    "python benchmarks/rotary_speed.py --batch-sizes 1 32 --repeats 9 --out benchmarks/results/rotary_speed_cpu": Small(
        {"benchmarks/results/rotary_speed_cpu": "{tmp}/rotary_speed"},
        """--batch-sizes 1 --repeats 1 --model-kwargs '{"img_size": 32, "patch_size": 4, "depth": 4}' --layers 1 2 3"""),
    # docs/lvvit.md
    "python -m evit_patch.finetune recipes/lvvit_fashion_mnist_pretrain.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.epochs=1 --set train.output_dir={{tmp}}/lvvit_pretrain"),
    "python -m evit_patch.finetune recipes/lvvit_fashion_mnist.yaml": Small(
        {}, f"{FASHION_MNIST_RUN} --set train.output_dir={{tmp}}/lvvit"),
}

CI_COMMANDS = {"bash .ci/setup", "bash .ci/run"}
RUN_ELSEWHERE = {"test_training_free_commands": "docs/findings.md, the training-free EViT section",
                 "test_dense_benchmarks": "docs/dense.md"}
