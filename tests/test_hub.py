"""utils/hub.py: the folder that --push_to_hub uploads and its model card, up to (never through) the network."""
import json
import os

import torch
from safetensors.torch import save_file

from conftest import run_script
from utils.hub import prepare_upload


def test_upload_folder_holds_weights_config_card_and_picture_only(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(run / "final" / "model.safetensors"))
    (run / "final" / "config.json").write_text(json.dumps({"num_classes": 11}))
    (run / "checkpoints").mkdir()  # must not be uploaded
    (run / "picture.png").write_bytes(b"png")
    results = {"mIoU": 41.234, "pixel_acc": 88.5, "per_class_iou": {"a": 1.0}}
    folder = prepare_upload(run, "segmentation", "someone/seg-demo", {"dataset": "fashion_mnist_seg", "epochs": 1},
                            results, run / "picture.png")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "segmentation_samples.png"]
    card = (folder / "README.md").read_text()
    assert 'ViTUperNet.from_pretrained("someone/seg-demo")' in card and "| mIoU | 41.23 |" in card
    assert "![segmentation samples](segmentation_samples.png)" in card and '"epochs": 1' in card
    assert "pipeline_tag: image-segmentation" in card


def test_push_to_hub_prepares_the_folder_and_survives_a_failed_upload(tmp_path, fashion_mnist_dir):
    os.environ["HF_HUB_OFFLINE"] = "1"  # the upload must fail here: no test touches the network
    try:
        result = run_script("pretrain_mae.py", "--working_directory", tmp_path, "--experiment_name", "hub",
                            "--max_train_steps", 2, "--max_samples", 64, "--per_gpu_batch_size", 32,
                            "--encoder_embed_dim", 32, "--encoder_depth", 1, "--encoder_num_heads", 2,
                            "--decoder_embed_dim", 16, "--decoder_depth", 1, "--decoder_num_heads", 2,
                            "--log_with", "none", "--push_to_hub", "--hub_model_id", "someone/tiny-mae")
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    folder = tmp_path / "hub" / "hub_upload"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                       "pretraining_samples.png"]
    assert 'MaskedAutoencoder.from_pretrained("someone/tiny-mae")' in (folder / "README.md").read_text()
    assert "upload to someone/tiny-mae failed" in result.stderr and "retry with: hf upload someone/tiny-mae" in result.stderr


def test_push_to_hub_without_a_repo_is_a_one_line_error(tmp_path):
    result = run_script("finetune_segmentation.py", "--from_scratch", "--push_to_hub", "--working_directory", tmp_path,
                        check=False)
    assert result.returncode == 2 and "--push_to_hub needs --hub_model_id user/name" in result.stderr


def test_the_card_names_license_data_base_model_metrics_and_command():
    from utils.hub import model_card

    args = {"dataset": "hf:someone/flowers", "path_to_pretrained_mae_weights": "facebook/vit-mae-base",
            "hub_license": "cc-by-nc-4.0", "epochs": 3}
    card = model_card("classification", "me/flowers-vit", args, {"top1": 91.5}, None,
                      "accelerate launch finetune_classifier.py --epochs 3")
    header = card.split("---")[1]
    for line in ("license: cc-by-nc-4.0", "datasets:\n- someone/flowers", "base_model: facebook/vit-mae-base",
                 "metrics:\n- top1", "pipeline_tag: image-classification"):
        assert line in header
    assert "python predict.py me/flowers-vit image.png" in card and "--epochs 3\n```" in card
    local = model_card("pretraining", "me/mae", {"dataset": "fashion_mnist", "resume_from_pretrained": "/tmp/x"},
                       {}, None)
    assert "base_model" not in local and "- zalando-datasets/fashion_mnist" in local and "license: apache-2.0" in local


def test_the_card_keeps_local_paths_out(tmp_path, monkeypatch):
    from utils.hub import prepare_upload

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(run / "final" / "model.safetensors"))
    (run / "final" / "config.json").write_text("{}")
    monkeypatch.setattr("sys.argv", ["pretrain_mae.py", "--path_to_data", str(tmp_path / "private" / "images"),
                                     "--epochs", "3"])
    card = (prepare_upload(run, "pretraining", "me/mae", {"dataset": f"hf:{tmp_path}/private/flowers"}, {})
            / "README.md")
    text = card.read_text()
    assert "private" not in text and "--path_to_data images --epochs 3" in text and "on `hf:flowers`" in text
    assert "datasets:" not in text.split("---")[1]  # a local folder is no Hub dataset
