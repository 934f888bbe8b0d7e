"""--config: recipes set flag defaults (flags win), every shipped recipe is valid for its script, a run's
config.yaml reproduces it, and --help shows the defaults."""
import json

import pytest
import yaml

import finetune_classifier
import finetune_segmentation
import pretrain_mae
from conftest import read_metrics, run_in_process
from utils.config import RECIPES
from utils.errors import UserError

SCRIPTS = {"pretrain": pretrain_mae, "finetune": finetune_classifier, "linear": finetune_classifier,
           "freeze": finetune_classifier, "segmentation": finetune_segmentation}


@pytest.mark.parametrize("recipe", sorted(str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")))
def test_every_recipe_is_read_by_its_script(recipe):
    values = yaml.safe_load((RECIPES / recipe).read_text())
    script = SCRIPTS[recipe.split("/")[-1].split("_")[0].removesuffix(".yaml")]
    args = script.parse_args(["--config", recipe.removesuffix(".yaml")])
    assert {key: getattr(args, key) for key in values} == values
    if script is pretrain_mae:  # the sizes resolve to a model config (no data needed)
        assert pretrain_mae.resolve_defaults(args)["embed_dim"] > 0


def test_flags_win_over_the_config_and_unknown_keys_are_one_line_errors(tmp_path):
    args = pretrain_mae.parse_args(["--config", "pretrain_vit_base", "--epochs", "5"])
    assert args.epochs == 5 and args.warmup_epochs == 40 and args.norm_pix_loss is True
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nepoch: 4\n")
    with pytest.raises(UserError, match="epoch is not a flag of .*: fix or remove it"):
        pretrain_mae.parse_args(["--config", str(bad)])
    with pytest.raises(UserError, match="no such file or recipe; pass a YAML file or one of: .*pretrain_vit_base"):
        pretrain_mae.parse_args(["--config", "pretrain_vit_b"])
    bad.write_text("- epochs\n")
    with pytest.raises(UserError, match="must be a mapping of flag names to values"):
        pretrain_mae.parse_args(["--config", str(bad)])
    bad.write_text("lr_schedule: linear\n")
    with pytest.raises(UserError, match="lr_schedule: 'linear' is not one of poly, cosine"):
        finetune_segmentation.parse_args(["--config", str(bad)])
    bad.write_text("base_learning_rate: 1e-3\nepochs: many\n")  # (YAML reads 1e-3 as a string)
    with pytest.raises(UserError, match="epochs: 'many' is not a valid value for --epochs"):
        pretrain_mae.parse_args(["--config", str(bad)])
    bad.write_text("base_learning_rate: 1e-3\n")
    assert pretrain_mae.parse_args(["--config", str(bad)]).base_learning_rate == 1e-3


def test_epochs_on_the_command_line_replace_the_configs_step_count():
    assert finetune_segmentation.parse_args(["--config", "segmentation_ade20k"]).max_train_steps == 160_000
    args = finetune_segmentation.parse_args(["--config", "segmentation_ade20k", "--epochs", "3"])
    assert args.epochs == 3 and args.max_train_steps is None
    args = finetune_segmentation.parse_args(["--config", "segmentation_ade20k", "--epochs=3", "--max_train_steps", "9"])
    assert args.epochs == 3 and args.max_train_steps == 9


def test_a_runs_config_yaml_reproduces_it(tmp_path, fashion_mnist_dir):
    common = ["--working_directory", tmp_path, "--log_with", "none", "--vis_every", 0]
    code, _ = run_in_process("pretrain_mae.py", *common, "--experiment_name", "first", "--max_samples", 64,
                             "--per_gpu_batch_size", 32, "--epochs", 1, "--log_every", 1, "--encoder_depth", 1,
                             "--decoder_depth", 1, "--mask_ratio", 0.5)
    assert code == 0
    saved = yaml.safe_load((tmp_path / "first" / "config.yaml").read_text())
    assert saved["mask_ratio"] == 0.5 and saved["encoder_depth"] == 1 and saved["max_samples"] == 64
    assert "experiment_name" not in saved and "resume_from_checkpoint" not in saved  # a replay is a run of its own
    assert saved["dataset"] is None and saved["warmup_epochs"] is None  # data-dependent: worked out again
    resolved = json.loads((tmp_path / "first" / "args.json").read_text())
    assert resolved["dataset"] == "fashion_mnist" and resolved["warmup_epochs"] == 0.25
    code, _ = run_in_process("pretrain_mae.py", "--config", tmp_path / "first" / "config.yaml",
                             "--experiment_name", "again")
    assert code == 0
    first, again = read_metrics(tmp_path / "first"), read_metrics(tmp_path / "again")
    assert [row["loss"] for row in first] == [row["loss"] for row in again] and len(first) == 2


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        pretrain_mae.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "AdamW weight decay (not on norms, biases, tokens). (default: 0.05)" in help_text
    assert "Share of patches hidden from the encoder. (default: 0.75)" in help_text


@pytest.mark.parametrize("flags,cache,auto_augment,magnitude", [
    (["--linear_probe", "--dataset", "synthetic"], True, None, None),  # a small built-in set: cached features
    (["--linear_probe", "--path_to_data", "images"], False, None, None),  # real data: augmented every epoch
    (["--linear_probe", "--path_to_data", "images", "--cache_features"], True, None, None),
    (["--config", "linear_probe_vit_base", "--path_to_data", "images"], False, None, None),
    (["--path_to_data", "images"], False, "rand-m9-mstd0.5-inc1", None),  # the official fine-tuning RandAugment
    (["--path_to_data", "images", "--random_aug_magnitude", "9"], False, None, 9),  # torchvision's, by name
])
def test_classifier_defaults_follow_the_official_recipes_on_real_data(flags, cache, auto_augment, magnitude):
    args = finetune_classifier.parse_args(["--from_scratch", *flags])
    finetune_classifier.resolve_defaults(args)
    assert (args.cache_features, args.auto_augment, args.random_aug_magnitude) == (cache, auto_augment, magnitude)
