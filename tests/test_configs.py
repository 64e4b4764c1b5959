"""Every config composes, every pair instantiates lazily, and bad values fail at start with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, standin_weights
from hydra.errors import HydraException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from ood_bench.data import DatasetNotFoundError, DigitsSource, Source
from ood_bench.data.anomaly import ASPECTS, AnomalySource
from ood_bench.data.download import DOWNLOADS
from ood_bench.data.transforms import PROTOCOLS
from ood_bench.logging.wandb_logger import WANDB_MODES
from ood_bench.methods import METHODS, build_method
from ood_bench.models.classifier import KINDS as CLASSIFIER_KINDS
from ood_bench.models.classifier import (
    CifarResNet,
    SmallCNN,
    load_cifar_resnet,
    resolve_module,
    validate_classifier_cfg,
)
from ood_bench.models.diffusion import PREDICTION_TYPES, build_unet
from ood_bench.runner import LOGGERS, run, validate
from ood_bench.tasks import get_task
from ood_bench.tasks.anomaly import MODES

CONFIG_GROUPS = ("data", "method", "model", "logger", "classifier")


def choices(group: str, nested: bool = True) -> list[str]:
    """Config files of a group, found at collection time (new files are picked up automatically); ``nested``
    includes sub-folders (``data=mvtec/bottle``)."""
    base = CONF_DIR / group
    found = base.rglob("*.yaml") if nested else base.glob("*.yaml")
    return sorted(p.relative_to(base).with_suffix("").as_posix() for p in found if not p.name.startswith("_"))


def check_data(data) -> None:
    """The data part of a composed config: an OOD pair (two dataset sources) or anomaly data (categories)."""
    assert isinstance(data.name, str) and data.name
    assert isinstance(data.image_size, int) and data.image_size >= 8
    assert data.channels in (1, 3)
    task = get_task(data)
    if task.name == "bench":  # one ID source against named OOD sets, each near or far
        assert issubclass(get_class(data.id._target_), Source) and data.ood_sets
        for entry in data.ood_sets.values():
            assert issubclass(get_class(entry.source._target_), Source) and entry.group in ("near", "far")
        assert data.resize_protocol in PROTOCOLS
        return
    if task.name == "ood":
        for side in ("id", "ood"):
            target = get_class(data[side]._target_)
            assert issubclass(target, Source), target
            assert data[side].name
        assert data.resize_protocol in PROTOCOLS
        return
    assert task.name == "anomaly" and "id" not in data and "ood" not in data
    assert data.categories, "anomaly data needs at least one category"
    for key, src in data.categories.items():
        assert issubclass(get_class(src._target_), AnomalySource), src._target_
        assert src.name == key  # rows, figures and labels are named after the source's name
        assert src.object_name and "?" not in str(src.object_name)
    assert data.aspect in ASPECTS and data.mode in MODES
    assert data.k_shot >= 1 and len(data.shot_seeds) >= 1


def check_common(cfg) -> None:
    """Fields every composed config must have, with values the runner accepts."""
    check_data(cfg.data)
    assert cfg.method.name in METHODS, f"method.name={cfg.method.name!r} not registered: {sorted(METHODS)}"
    assert cfg.model.name and "scheduler" in cfg.model and "unet" in cfg.model
    assert cfg.logger.name in LOGGERS
    assert cfg.classifier.name and cfg.classifier.kind in CLASSIFIER_KINDS
    for key in ("results_dir", "cache_dir", "log_dir", "data_dir", "weights_dir", "output_dir"):
        assert OmegaConf.select(cfg, f"paths.{key}") is not None
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Composition of every choice of every group
# ---------------------------------------------------------------------------------------------------------------


def test_groups_are_not_empty():
    for group in ("data", "method", "model", "logger", "dataset", "classifier"):
        assert choices(group), group
    assert "digits" in choices("data") and "lmd" in choices("method")


def test_default_config(cfg_default):
    check_common(cfg_default)
    assert cfg_default.data.name == "digits" and cfg_default.logger.name == "csv"
    assert cfg_default.overwrite is False and cfg_default.device == "auto"


@pytest.mark.parametrize("choice", choices("data"))
def test_data_config_composes(hydra_conf, tmp_path, choice):
    cfg = hydra_conf([f"data={choice}"], tmp_path)
    check_common(cfg)
    assert cfg.data.name == choice.replace("/", "_")  # results folders are named after data.name


def test_anomaly_data_covers_every_mvtec_and_visa_category():
    data = choices("data")
    assert len([c for c in data if c.startswith("mvtec/") and c != "mvtec/all"]) == 15
    assert len([c for c in data if c.startswith("visa/") and c != "visa/all"]) == 12
    assert {"magnetic_tile", "kolektor_sdd", "surface_defects", "folder"} <= set(data)


@pytest.mark.parametrize("choice", choices("data"))
def test_data_sources_instantiate_lazily(hydra_conf, tmp_path, choice):
    """Construction reads nothing; reading from an empty data folder names the folder (digits is embedded)."""
    empty = tmp_path / "no_data_here"
    cfg = hydra_conf([f"data={choice}", f"paths.data_dir={empty}"], tmp_path)
    if get_task(cfg.data).name == "anomaly":
        for src_cfg in cfg.data.categories.values():
            src = instantiate(src_cfg)
            assert isinstance(src, AnomalySource) and src.describe()["name"] == src.name == src_cfg.name
            with pytest.raises(DatasetNotFoundError) as err:
                src.samples()
            assert str(empty) in str(err.value) and "Expected layout" in str(err.value)
            if src.archive:  # official archive: the message says where to get it and its hash
                assert DOWNLOADS[src.archive].url in str(err.value) and DOWNLOADS[src.archive].sha256 in str(err.value)
        assert not empty.exists()
        return
    sides = (
        [cfg.data.id, cfg.data.ood]
        if "ood" in cfg.data
        else [cfg.data.id, *(e.source for e in cfg.data.ood_sets.values())]
    )
    for side_cfg in sides:
        src = instantiate(side_cfg)
        assert isinstance(src, Source) and src.name == side_cfg.name
        assert src.describe()["name"] == src.name
        if isinstance(src, DigitsSource):
            assert len(src.labels("test")) > 0
            continue
        with pytest.raises(DatasetNotFoundError) as err:
            src.labels("test")
        assert str(empty) in str(err.value)
    assert not empty.exists()


def build_method_or_skip(cfg, weights_dir: Path):
    """Build the configured method. Some methods load pretrained weights in their constructor (to fail before any
    data is read): they get ``weights_dir`` (``weights_dir_with_b4``: stand-ins where the offline files are absent;
    the config is checked, not the features); a method that needs a file no stand-in provides (e.g. a Stable
    Diffusion stack) is skipped with the error."""
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    if "weights_dir" in method_cfg:
        method_cfg["weights_dir"] = str(weights_dir)
    try:
        return build_method(method_cfg)
    except FileNotFoundError as err:  # includes EncoderWeightsError
        pytest.skip(f"method {cfg.method.name} needs a file absent here: {err}")


# `custom` is your own class (method._target_): composed, built and run in tests/test_api.py
@pytest.mark.parametrize("choice", [c for c in choices("method") if c != "custom"])
def test_method_config_composes_and_builds(hydra_conf, tmp_path, choice, weights_dir_with_b4):
    cfg = hydra_conf([f"method={choice}"], tmp_path)
    if "ood" not in METHODS[cfg.method.name].tasks:  # an anomaly-only method composes with anomaly data
        cfg = hydra_conf([f"method={choice}", "data=magnetic_tile"], tmp_path)
    check_common(cfg)
    method = build_method_or_skip(cfg, weights_dir_with_b4)
    assert type(method) is METHODS[cfg.method.name]
    assert isinstance(method.describe(), dict)


@pytest.mark.parametrize("choice", choices("model"))
def test_model_config_composes_and_builds(hydra_conf, tmp_path, choice):
    cfg = hydra_conf([f"model={choice}"], tmp_path)
    check_common(cfg)
    assert cfg.model.name == choice
    assert cfg.model.scheduler.get("prediction_type", "epsilon") in PREDICTION_TYPES
    for key in ("steps", "batch_size", "lr", "seed"):
        assert key in cfg.model.train
    if cfg.model.pretrained:
        return  # a hub id or folder: loading is tested in test_cache_results.py
    unet_cfg = OmegaConf.to_container(cfg.model.unet, resolve=True)
    with torch.random.fork_rng(devices=[]):
        unet = build_unet(unet_cfg, sample_size=32, channels=3)
    assert unet.config.sample_size == 32 and unet.config.in_channels == 3 == unet.config.out_channels


@pytest.mark.parametrize("choice", choices("classifier"))
def test_classifier_config_composes_and_builds(hydra_conf, tmp_path, choice):
    """Every classifier config validates, and its network builds with the CAM layer it names (weights are loaded
    where they exist offline: the CIFAR ResNets; torchvision's ImageNet weights need a download)."""
    import torchvision

    cfg = hydra_conf([f"classifier={choice}"], tmp_path)
    check_common(cfg)
    c = OmegaConf.to_container(cfg.classifier, resolve=True)
    assert c["name"] == choice
    validate_classifier_cfg(c)
    if c["kind"] == "small_cnn":
        net = SmallCNN(3, 10, c["width"])
    elif c["kind"] == "cifar_resnet":
        weights = Path(cfg.paths.weights_dir)
        if (weights / c["checkpoint"]).is_file():
            net = load_cifar_resnet(c, weights).net  # the checkpoint fits the configured depth
        else:  # no checkpoint here: the configured depth's network and its CAM layer are still checked
            net = CifarResNet(int(c["depth"]), num_classes=10)
    else:
        net = torchvision.models.get_model(c["arch"], weights=None, num_classes=c["num_classes"])
    resolve_module(net, c["cam_layer"])


@pytest.mark.parametrize("choice", choices("logger"))
def test_logger_config_composes(hydra_conf, tmp_path, choice):
    cfg = hydra_conf([f"logger={choice}"], tmp_path)
    check_common(cfg)
    assert cfg.logger.name == choice
    if choice == "wandb":
        assert cfg.logger.mode in WANDB_MODES
        assert cfg.logger.dir == str(tmp_path / "output")  # ${paths.output_dir}


@pytest.mark.parametrize("choice", choices("experiment"))
def test_experiment_config_composes(hydra_conf, tmp_path, choice, weights_dir_with_b4):
    """An experiment composes, its method builds (the paper-size DLSR encoder from a B4 file of the right shapes
    written by the test), and every choice its sweep lists exists and composes."""
    from hydra import compose

    cfg = hydra_conf([f"experiment={choice}", f"paths.weights_dir={weights_dir_with_b4}"], tmp_path)
    check_common(cfg)
    full = compose(config_name="config", overrides=[f"experiment={choice}"], return_hydra_config=True)
    params = OmegaConf.to_container(full.hydra.sweeper.params) or {}
    for key, values in params.items():
        if key not in CONFIG_GROUPS:
            continue
        for value in str(values).split(","):
            value = value.strip()
            assert value in choices(key), f"experiment {choice} sweeps {key}={value}, not in conf/{key}/"
            swept = hydra_conf([f"experiment={choice}", f"{key}={value}"], tmp_path)
            check_common(swept)
    build_method_or_skip(cfg, weights_dir_with_b4)


# ---------------------------------------------------------------------------------------------------------------
# Wrong choices and wrong values
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", ["data", "method", "model", "logger", "classifier"])
def test_wrong_group_choice_lists_valid_choices(hydra_conf, tmp_path, group):
    with pytest.raises(HydraException) as err:
        hydra_conf([f"{group}=nope"], tmp_path)
    msg = str(err.value)
    assert f"{group}/nope" in msg and "Available options" in msg
    for valid in choices(group, nested=False):  # Hydra lists the group's own files; sub-folders are sub-groups
        assert valid in msg


def _fail_fast_cfg(hydra_conf, tmp_path, overrides):
    """A config whose data reads would fail (no files under paths.data_dir): a ValueError proves validation
    ran before any data was read; nothing may be written."""
    return hydra_conf(["data=mnist_fashionmnist", f"paths.data_dir={tmp_path / 'no_data'}", *overrides], tmp_path)


BAD_VALUES = [
    (["method.distance=foo"], r"method\.distance='foo'.*lpips.*mse.*ssim"),
    (["method.reps=0"], r"method\.reps=0.*positive integer"),
    (["method.steps=-3"], r"method\.steps=-3.*positive integer"),
    (["method.sampler=euler"], r"method\.sampler='euler'.*ddim.*ddpm"),
    (["method.mask=stripes"], r"method\.mask='stripes'.*checkerboard_alt"),
    (["method.aggregate=max"], r"method\.aggregate='max'.*median.*mean"),
    (["method.eta=1.5"], r"method\.eta=1\.5"),
    (["data.resize_protocol=bar"], r"data\.resize_protocol='bar'.*common_min.*direct"),
    (["data.n_train=0"], r"data\.n_train=0.*positive integer"),
    (["data.n_ood_test=-5"], r"data\.n_ood_test=-5"),
    (["logger=wandb", "logger.mode=bogus"], r"logger\.mode='bogus'.*online.*offline.*disabled"),
]


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_fails_at_start(hydra_conf, tmp_path, overrides, message):
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, overrides)
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_fails_at_start(hydra_conf, tmp_path):
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, ["device=cuda:0"])
    with pytest.raises(ValueError, match=r"device='cuda:0'.*CUDA is not available.*device=auto or device=cpu"):
        run(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "overrides, key, valid",
    [
        (["method.lpips_net=resnet"], "method.lpips_net='resnet'", ["alex", "vgg", "squeeze"]),
        (["model.scheduler.prediction_type=x0"], "prediction_type='x0'", ["epsilon", "sample", "v_prediction"]),
    ],
    ids=["lpips_net", "prediction_type"],
)
def test_model_and_distance_settings_fail_before_data_is_read(hydra_conf, tmp_path, overrides, key, valid):
    """Settings checked deeper down (distance, noise schedule) must also fail before any data is read,
    as ``runner.validate`` promises."""
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, overrides)
    with pytest.raises(ValueError) as err:
        run(cfg)
    msg = str(err.value)
    assert key in msg, msg
    for v in valid:
        assert v in msg, msg
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.image_size=28", "method.num_blocks=8"], "num_blocks=8"),  # 8 blocks do not divide 28 px
        (["method.num_blocks=1"], "num_blocks=1"),  # a checkerboard needs at least 2 blocks
        (["method.steps=2000"], "steps=2000"),  # more sampling steps than the model's 1000 training steps
        (["method.sampler=subvp_em"], "model.train.sde=subvp"),  # the official sampler on a DDPM-trained model
        (["method.sampler=subvp_em", "model.train.sde=subvp", "method.clip=true"], "method.clip=true"),
        (["model.train.sde=vp"], "model.train.sde='vp'"),
    ],
    ids=["blocks_vs_image_size", "one_block", "steps_vs_train_timesteps", "subvp_em_on_ddpm", "subvp_em_clip", "sde"],
)
def test_lmd_settings_fail_before_data_is_read(hydra_conf, tmp_path, overrides, key):
    """LMD settings that only make sense with the image size or the noise schedule are checked at score time
    today, after the data is read and the model trained; they must fail at start like the others."""
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, ["method=lmd", "method.distance=mse", *overrides])
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert key in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_unknown_method_name_lists_registered(hydra_conf, tmp_path):
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, ["method.name=nope"])
    with pytest.raises((KeyError, ValueError)) as err:
        run(cfg)
    for name in METHODS:
        assert name in str(err.value)


def test_missing_data_is_reported_after_validation(hydra_conf, tmp_path):
    """With valid settings the same config reaches the data and names the missing folder."""
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, ["method.distance=mse"])
    with pytest.raises(DatasetNotFoundError, match="no_data"):
        run(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Anomaly detection: debug settings, bad values, method/task mismatches
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", choices("debug"))
def test_debug_config_composes_with_its_task(hydra_conf, tmp_path, choice):
    data = "magnetic_tile" if choice == "anomaly" else "digits"
    method = "patch_knn" if choice == "anomaly" else "lmd_mse"
    cfg = hydra_conf([f"data={data}", f"method={method}", f"debug={choice}"], tmp_path)
    check_common(cfg)
    assert cfg.progress is False


ANOMALY_BAD_VALUES = [
    (["data.aspect=stretch"], r"data\.aspect='stretch'.*resize.*center_crop"),
    (["data.mode=both"], r"data\.mode='both'.*per_category.*multi_class"),
    (["data.k_shot=0"], r"data\.k_shot=0.*positive integer"),
    (["data.shot_seeds=[]"], r"data\.shot_seeds=.*non-empty list of distinct integers"),
    (["data.shot_seeds=[1,1]"], r"data\.shot_seeds=.*distinct"),
    (["data.n_test=0"], r"data\.n_test=0.*positive integer or null"),
    (["optimized_metric=auroc"], r"optimized_metric='auroc'.*anomaly task.*image_auroc"),
    (["method=lmd_mse"], r"method\.name='lmd'.*\['ood'\].*'anomaly'.*patch_knn"),
    (["debug=default"], r"data\.n_train is a setting of OOD pairs.*debug=anomaly"),
    (["method.image_score=mean"], r"method\.image_score='mean'.*max.*topk_mean"),
    (["data.image_size=16"], r"data\.image_size=16 is too small for method\.layers"),
]


@pytest.mark.parametrize("overrides, message", ANOMALY_BAD_VALUES, ids=[" ".join(o) for o, _ in ANOMALY_BAD_VALUES])
def test_anomaly_bad_value_fails_at_start(hydra_conf, tmp_path, overrides, message):
    standin = f"paths.weights_dir={standin_weights()}"  # the layer-size check builds the encoder: any weights do
    cfg = hydra_conf(
        ["data=magnetic_tile", "method=patch_knn", f"paths.data_dir={tmp_path / 'no_data'}", standin, *overrides],
        tmp_path,
    )
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_anomaly_method_refuses_ood_data(hydra_conf, tmp_path):
    cfg = _fail_fast_cfg(hydra_conf, tmp_path, ["method=patch_knn"])
    with pytest.raises(ValueError, match=r"method\.name='patch_knn'.*\['anomaly'\].*'ood'.*lmd"):
        run(cfg)
    assert not (tmp_path / "cache").exists()


def test_missing_anomaly_data_names_layout_and_download(hydra_conf, tmp_path):
    """A missing MVTec category fails after validation with the expected layout, the URL and its hash."""
    standin = f"paths.weights_dir={standin_weights()}"  # the encoder is built (weights loaded) before data is read
    cfg = hydra_conf(
        ["data=mvtec/bottle", "method=patch_knn", f"paths.data_dir={tmp_path / 'no_data'}", standin], tmp_path
    )
    with pytest.raises(DatasetNotFoundError) as err:
        run(cfg)
    msg = str(err.value)
    assert str(tmp_path / "no_data" / "mvtec_anomaly_detection" / "bottle") in msg
    assert "train/good" in msg and "ground_truth/<defect>/<stem>_mask.png" in msg
    assert DOWNLOADS["mvtec_ad"].url in msg and "data.download=true" in msg
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("choice", [c for c in choices("experiment") if c.startswith("lmd_") and c != "lmd_cpu"])
def test_lmd_paper_experiments_run_the_official_sampler_forms(hydra_conf, tmp_path, choice):
    """Paper-table LMD configs: no clipping; GPU-sized ones the official 1000-step budget on full test sets;
    Table 1 the official 3-channel 32 px form of the MNIST-family images (recon.py)."""
    pair = "fashionmnist_kmnist" if choice in ("lmd_table1", "lmd_table1_cpu") else None
    cfg = hydra_conf([f"experiment={choice}", *([f"data={pair}"] if pair else [])], tmp_path)
    assert cfg.method.clip is False
    if not choice.endswith("_cpu"):
        assert (cfg.method.sampler, cfg.method.steps, cfg.method.reps) == ("ddpm", 1000, 10)
        assert cfg.data.n_id_test is None and cfg.data.n_ood_test is None
    if pair:
        assert (cfg.data.name, cfg.data.channels, cfg.data.image_size) == (pair, 3, 32)
