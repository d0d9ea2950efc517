"""Tests for the structured ``fedeq simulate`` configuration."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from fedeq.config import (
    RUN_CONFIG_KEY,
    ConfigError,
    FedeqConfig,
    config_from_run_config,
    config_from_yaml,
    default_config,
    load_config,
    to_run_config,
    to_yaml,
    validate,
)
from fedeq.devices.assign import assign_tiers
from fedeq.registry import BACKWARDS, DATASETS, ENGINES, MODELS, SOLVERS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "simulations" / "configs"


def _container(cfg: FedeqConfig) -> dict:
    return cfg.model_dump()


def _expect_error(overrides: list[str], key: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    err = info.value
    assert err.key == key, str(err)
    message = str(err)
    assert "\n" not in message
    assert message.startswith(f"{key}: ")
    assert "; allowed: " in message and "(got " in message
    for fragment in fragments:
        assert fragment in message, message
    return err


# ------------------------------------------------------------------------------------------------
# defaults and files
# ------------------------------------------------------------------------------------------------


def test_default_is_valid_with_four_tiers_spanning_budgets() -> None:
    cfg = load_config()
    validate(cfg)
    assert cfg.rounds == 20 and cfg.num_clients == 20 and cfg.clients_per_round == 10
    assert cfg.data.name == "digits" and cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5
    assert cfg.engine == "ray" and cfg.run_name is None
    tiers = cfg.devices.tiers
    assert [t.name for t in tiers] == ["micro", "phone", "laptop", "workstation"]
    budgets = [t.f_max_iter for t in tiers]
    assert min(budgets) == 2 and max(budgets) == 30
    assert budgets == sorted(budgets)
    assert sum(t.share for t in tiers) == pytest.approx(1.0)
    assert list(cfg.eval.budgets) == [1, 2, 4, 8, 16, 32]
    assert _container(cfg) == _container(default_config())


def test_default_yaml_equals_structured_default() -> None:
    path = CONFIG_DIR / "default.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert raw == _container(default_config())
    assert _container(load_config(path)) == _container(default_config())


@pytest.mark.parametrize("name", ["default", "quick", "mnist5k"])
def test_example_configs_are_valid(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    validate(cfg)


def test_quick_and_mnist5k_contents() -> None:
    quick = load_config(CONFIG_DIR / "quick.yaml")
    assert quick.num_clients == 4 and quick.rounds == 2 and len(quick.devices.tiers) == 2
    assert quick.clients_per_round <= quick.num_clients
    mnist = load_config(CONFIG_DIR / "mnist5k.yaml")
    assert mnist.data.name == "mnist5k" and mnist.model.name == "conv_deq" and mnist.num_clients == 20


def test_yaml_file_and_overrides_merge(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "rounds: 5\n"
        "train:\n  lr: 1e-3\n  optimizer: sgd\n"
        "strategy:\n  name: my_pkg.strategies:Custom\n  kwargs: {beta: 0.9}\n",
        encoding="utf-8",
    )
    cfg = load_config(
        path,
        [
            "rounds=7",
            "devices.tiers.0.f_max_iter=5",
            "devices.tiers[3].b_max_iter=12",
            "eval.budgets=[1, 3]",
            "run_name=exp1",
            "strategy.kwargs.gamma=2",
        ],
    )
    assert cfg.rounds == 7  # override wins over the file
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.optimizer == "sgd"  # from the file
    assert cfg.train.batch_size == 32  # untouched default
    assert cfg.devices.tiers[0].f_max_iter == 5 and cfg.devices.tiers[3].b_max_iter == 12
    assert cfg.devices.tiers[1].f_max_iter == 6
    assert list(cfg.eval.budgets) == [1, 3]
    assert cfg.run_name == "exp1"
    assert cfg.strategy.name == "my_pkg.strategies:Custom"
    assert dict(cfg.strategy.kwargs) == {"beta": 0.9, "gamma": 2}


def test_yaml_tier_list_replaces_default_tiers(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(
        "devices:\n  tiers:\n"
        "    - {name: a, share: 0.5, f_max_iter: 3, b_max_iter: 3}\n"
        "    - {name: b, share: 0.5, solver: broyden, f_max_iter: 9, b_max_iter: 9,\n"
        "       backward: broyden_reuse}\n",
        encoding="utf-8",
    )
    cfg = load_config(path)
    assert [t.name for t in cfg.devices.tiers] == ["a", "b"]
    assert cfg.devices.tiers[0].solver == "anderson"  # TierConfig default


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    _expect_error(["epochs=3"], "epochs", "unknown key", "rounds", "num_clients", "devices")


def test_unknown_nested_key() -> None:
    _expect_error(["train.momentum=0.9"], "train.momentum", "unknown key", "lr", "optimizer", "proximal_mu")


def test_unknown_key_in_yaml_tier(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "devices:\n  tiers:\n    - {name: a, share: 1.0, f_max_iter: 2, b_max_iter: 2, cores: 4}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "devices.tiers[0].cores"
    assert "f_max_iter" in str(info.value) and "num_cpus" in str(info.value)


def test_wrong_type() -> None:
    _expect_error(["rounds=abc"], "rounds", "integer", "'abc'")


def test_wrong_type_inside_yaml_tier_list() -> None:
    _expect_error(
        ["devices.tiers=[{name: a, share: 1.0, f_max_iter: fast, b_max_iter: 2}]"],
        "devices.tiers[0].f_max_iter",
        "integer",
    )


def test_missing_tier_field() -> None:
    _expect_error(
        ["devices.tiers=[{name: a, share: 1.0, b_max_iter: 2}]"], "devices.tiers[0].f_max_iter", "missing"
    )


@pytest.mark.parametrize("alpha", ["0", "-0.5"])
def test_alpha_must_be_positive(alpha: str) -> None:
    _expect_error([f"data.alpha={alpha}"], "data.alpha", "> 0")


def test_shares_must_sum_to_one() -> None:
    _expect_error(["devices.tiers.0.share=0.5"], "devices.tiers", "sum to 1", "1.25")


def test_f_max_iter_must_be_positive() -> None:
    _expect_error(["devices.tiers.1.f_max_iter=0"], "devices.tiers[1].f_max_iter", ">= 1")


def test_unknown_data_name() -> None:
    _expect_error(["data.name=cifar10"], "data.name", *DATASETS.names())


def test_unknown_model_name() -> None:
    _expect_error(["model.name=resnet"], "model.name", *MODELS.names())


def test_unknown_solver() -> None:
    _expect_error(["devices.tiers.2.solver=newton"], "devices.tiers[2].solver", *SOLVERS.names())


def test_unknown_backward() -> None:
    _expect_error(["devices.tiers.0.backward=magic"], "devices.tiers[0].backward", *BACKWARDS.names())


def test_broyden_reuse_requires_broyden() -> None:
    _expect_error(["devices.tiers.1.backward=broyden_reuse"], "devices.tiers[1].backward", "broyden")
    cfg = load_config(None, ["devices.tiers.3.backward=broyden_reuse"])  # workstation uses broyden
    assert cfg.devices.tiers[3].backward == "broyden_reuse"


def test_bad_engine() -> None:
    _expect_error(["engine=spark"], "engine", *ENGINES.names())


def test_npz_requires_path() -> None:
    _expect_error(["data.name=npz"], "data.path", "npz")
    cfg = load_config(None, ["data.name=npz", "data.path=/tmp/data.npz"])
    assert cfg.data.path == "/tmp/data.npz"


def test_bad_override_syntax() -> None:
    _expect_error(["rounds"], "overrides", "key=value", "'rounds'")


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.key == "config"
    assert str(missing) in str(info.value)


def test_malformed_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("rounds: [1, 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "config"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("clients_per_round=21", "clients_per_round"),
        ("rounds=0", "rounds"),
        ("num_clients=0", "num_clients"),
        ("eval.budgets=[1, 0]", "eval.budgets[1]"),
        ("data.test_fraction=1.0", "data.test_fraction"),
        ("devices.tiers.0.availability=0", "devices.tiers[0].availability"),
        ("devices.tiers.0.name=phone", "devices.tiers[1].name"),  # second use of the name
        ("devices.tiers.9.f_max_iter=3", "devices.tiers[9]"),
        ("devices.deadline_s=0", "devices.deadline_s"),
        ("strategy.name=not a name", "strategy.name"),
        ("train.jac_reg=-1", "train.jac_reg"),
        ("train.proximal_mu=-0.1", "train.proximal_mu"),
    ],
)
def test_other_invalid_values(override: str, key: str) -> None:
    _expect_error([override], key)


def test_validate_catches_later_assignment() -> None:
    cfg = load_config()
    cfg.devices.tiers[2].f_max_iter = 0
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert info.value.key == "devices.tiers[2].f_max_iter"


def test_config_error_is_value_error_and_picklable() -> None:
    err = _expect_error(["engine=spark"], "engine")
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert clone.key == err.key and str(clone) == str(err)


# ------------------------------------------------------------------------------------------------
# tiers
# ------------------------------------------------------------------------------------------------


def test_assign_tiers_counts_match_shares() -> None:
    cfg = load_config()
    tiers = assign_tiers(cfg)
    assert len(tiers) == cfg.num_clients
    assert Counter(tiers) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert tiers[:4] == [0, 1, 2, 3]  # interleaved, not blocks
    assert assign_tiers(cfg) == tiers  # deterministic


def test_assign_tiers_uneven_shares_largest_remainder() -> None:
    cfg = load_config(
        None,
        [
            "num_clients=10",
            "clients_per_round=5",
            "devices.tiers.0.share=0.55",
            "devices.tiers.1.share=0.25",
            "devices.tiers.2.share=0.15",
            "devices.tiers.3.share=0.05",
        ],
    )
    counts = Counter(assign_tiers(cfg))
    # exact quotas 5.5, 2.5, 1.5, 0.5 -> floors 5, 2, 1, 0; the 2 leftover seats go to tiers 0 and 1
    assert [counts[i] for i in range(4)] == [6, 3, 1, 0]


def test_assign_tiers_explicit_ids_first() -> None:
    cfg = load_config(
        None,
        [
            "devices.tiers.3.ids=[0, 1, 2, 3]",
            "devices.tiers.0.share=0.5",
            "devices.tiers.1.share=0.25",
            "devices.tiers.2.share=0.25",
        ],
    )
    tiers = assign_tiers(cfg)
    assert tiers[:4] == [3, 3, 3, 3]
    assert Counter(tiers[4:]) == {0: 8, 1: 4, 2: 4}


def test_explicit_ids_validated() -> None:
    _expect_error(["devices.tiers.3.ids=[0, 20]", "devices.tiers.0.share=0.5"], "devices.tiers[3].ids[1]")


# ------------------------------------------------------------------------------------------------
# serialization
# ------------------------------------------------------------------------------------------------


def test_yaml_round_trip() -> None:
    cfg = load_config(None, ["train.lr=1e-5", "strategy.kwargs.beta=0.5", "devices.deadline_s=12.5"])
    again = config_from_yaml(to_yaml(cfg))
    assert _container(again) == _container(cfg)


def test_run_config_round_trip() -> None:
    cfg = load_config(CONFIG_DIR / "quick.yaml", ["train.lr=0.003", "run_name=smoke"])
    run_config = to_run_config(cfg)
    assert set(run_config) == {RUN_CONFIG_KEY} and isinstance(run_config[RUN_CONFIG_KEY], str)
    assert _container(config_from_run_config(run_config)) == _container(cfg)


def test_run_config_flat_overrides() -> None:
    cfg = config_from_run_config(
        {RUN_CONFIG_KEY: "", "rounds": 3, "train.lr": "0.5", "eval.budgets": "[2, 4]"}
    )
    assert cfg.rounds == 3 and cfg.train.lr == 0.5 and list(cfg.eval.budgets) == [2, 4]
    assert cfg.num_clients == 20  # embedded default underneath
    assert _container(config_from_run_config({})) == _container(default_config())


def test_run_config_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_run_config({RUN_CONFIG_KEY: "", "num-server-rounds": 3})
    assert info.value.key == "num-server-rounds"
    assert "rounds" in str(info.value)


def test_local_ray_cluster_gets_whole_cpus_for_fractional_tiers():
    from fedeq.engines.ray.engine import plan_pools

    cfg = load_config(None, ["ray.num_cpus=2", "devices.tiers.3.num_cpus=0.25"])
    sizes, cpus = plan_pools(cfg)
    assert sizes == [1, 1, 1, 2]  # 0.25 of the clients at 0.25 CPU an actor: two actors on 2 CPUs
    need = sum(n * float(t.num_cpus) for n, t in zip(sizes, cfg.devices.tiers, strict=True))
    assert isinstance(cpus, int) and need <= cpus < need + 1


# ------------------------------------------------------------------------------------------------
# registries and plugins
# ------------------------------------------------------------------------------------------------


def test_backward_class_declares_its_solver() -> None:
    class NeedsAnderson:
        requires_solver = "anderson"

    BACKWARDS.register("needs_anderson", NeedsAnderson)
    try:
        err = _expect_error(["devices.tiers.0.backward=needs_anderson"], "devices.tiers[0].backward")
        assert "needs_anderson requires solver anderson (solver is fixed_point)" in str(err)
        assert "or set solver=anderson" in str(err)
        cfg = load_config(None, ["devices.tiers.1.backward=needs_anderson"])  # phone uses anderson
        assert cfg.devices.tiers[1].backward == "needs_anderson"
    finally:
        BACKWARDS.unregister("needs_anderson")


def _write_plugin(path: Path, name: str) -> Path:
    path.write_text(
        f"from fedeq.registry import MODELS\n\nMODELS.register({name!r}, MODELS.get('mlp_deq'))\n",
        encoding="utf-8",
    )
    return path


def test_plugin_file_registers_a_model_name(tmp_path: Path) -> None:
    _expect_error(["model.name=plugin_mlp"], "model.name", "mlp_deq")
    plugin = _write_plugin(tmp_path / "my_models.py", "plugin_mlp")
    try:
        cfg = load_config(None, [f"plugins=[{plugin}]", "model.name=plugin_mlp"])
        assert cfg.model.name == "plugin_mlp" and cfg.plugins == [str(plugin)]
    finally:
        MODELS.unregister("plugin_mlp")


def test_relative_plugin_path_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_plugin(tmp_path / "relative_models.py", "relative_mlp")
    monkeypatch.chdir(tmp_path)
    try:
        cfg = load_config(None, ["plugins=[relative_models.py]", "model.name=relative_mlp"])
    finally:
        MODELS.unregister("relative_mlp")
    assert cfg.plugins == [str(tmp_path / "relative_models.py")]


@pytest.mark.parametrize("spec", ["no_such_plugin_module_xyz", "missing_dir/missing_plugin.py"])
def test_plugin_that_cannot_be_imported(spec: str) -> None:
    err = _expect_error(
        ["plugins=[fedeq.registry, " + spec + "]"],
        "plugins[1]",
        "cannot import plugin (",
        "allowed: an importable module name or an existing .py file",
        repr(spec),
    )
    assert err.got == spec


def test_plugins_survive_the_run_config_round_trip_into_a_new_process(tmp_path: Path) -> None:
    plugin = _write_plugin(tmp_path / "remote_models.py", "remote_mlp")
    try:
        cfg = load_config(None, [f"plugins=[{plugin}]", "model.name=remote_mlp"])
        run_config = to_run_config(cfg)
        assert _container(config_from_run_config(run_config)) == _container(cfg)
    finally:
        MODELS.unregister("remote_mlp")
    # a worker process knows nothing of the plugin until the config names it
    script = (
        "import json, sys\n"
        "from fedeq.config import config_from_run_config\n"
        "cfg = config_from_run_config(json.loads(sys.stdin.read()))\n"
        "print(cfg.model.name, cfg.plugins[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(run_config),
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["remote_mlp", str(plugin)]
