import pytest
import yaml

from genrep.config import (
    Config,
    apply_overrides,
    config_from_dict,
    load_config_file,
    parse_overrides,
    recipe_names,
    resolve_config,
    save_config,
)
from genrep.errors import GenrepError
from genrep.methods import method_names


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_shipped_recipe_resolves(recipe):
    cfg = resolve_config(recipe)
    assert cfg.recipe == recipe
    assert cfg.method in method_names()


def test_every_method_has_a_digits_recipe():
    from genrep.methods import get_method

    for name in method_names():
        if get_method(name).__module__.startswith("genrep."):  # shipped, not the tests' own toy method
            assert f"{name}-digits" in recipe_names()


def test_overrides_are_typed():
    ov = parse_overrides(["--optim.lr", "3e-4", "--train.compile", "true", "--probe.knn_k", "[5, 10]",
                          "--train.epochs=2", "--data.image_size", "null"])
    cfg = resolve_config("supervised-digits", ov)
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.compile is True
    assert cfg.probe.knn_k == [5, 10]
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)  # an int where a float is expected
    assert cfg.data.image_size is None


def test_a_single_value_for_a_list_key_is_a_one_element_list():
    assert resolve_config("supervised-digits", {"probe.knn_k": 20}).probe.knn_k == [20]


def test_a_comma_separated_value_for_a_list_key_is_a_list():
    ov = parse_overrides(["--eval.protocols", "ood,calibration", "--probe.knn_k", "5, 10",
                          "--eval.lowshot.fractions", "0.01,0.1"])
    cfg = resolve_config("supervised-digits", ov)
    assert cfg.eval.protocols == ["ood", "calibration"] and cfg.probe.knn_k == [5, 10]
    assert cfg.eval.lowshot.fractions == [0.01, 0.1]
    with pytest.raises(GenrepError):
        resolve_config("supervised-digits", {"probe.knn_k": "5,x"})


@pytest.mark.parametrize("key, fragment", [
    ("optim.lrr", "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ("model.dimm", "unknown config key 'model.dimm' (did you mean 'dim'?)"),
    ("trian.steps", "unknown config key 'trian'"),
])
def test_unknown_key_names_the_key_and_valid_choices(key, fragment):
    with pytest.raises(GenrepError) as e:
        resolve_config("supervised-digits", {key: 1})
    assert fragment in str(e.value) and "valid keys" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, expected", [
    ("train.steps", "many", "must be int"),
    ("train.compile", 3, "must be bool"),
    ("optim.lr", "fast", "must be float"),
    ("model.dim", 1.5, "must be int"),
])
def test_wrong_type_names_the_key(key, value, expected):
    with pytest.raises(GenrepError, match=expected) as e:
        resolve_config("supervised-digits", {key: value})
    assert key in str(e.value)


def test_unknown_recipe_and_method():
    with pytest.raises(GenrepError, match="unknown recipe 'supervised-digit' \\(did you mean 'supervised-digits'"):
        resolve_config("supervised-digit")
    with pytest.raises(GenrepError, match="unknown method 'supervisd'.*registered methods: .*supervised"):
        config_from_dict({"method": "supervisd"})


def test_section_given_a_value():
    with pytest.raises(GenrepError, match="'optim' in 'optim.lr' is a value"):
        apply_overrides({"optim": 3}, {"optim.lr": 1})


def test_recipe_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"method": "supervised", "model": {"dim": 16, "num_heads": 2}}))
    cfg = resolve_config(str(path))
    assert cfg.recipe == "mine" and cfg.model.dim == 16


def test_overrides_need_values_and_dashes():
    with pytest.raises(GenrepError, match="needs a value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(GenrepError, match="unexpected argument 'optim.lr'"):
        parse_overrides(["optim.lr", "1"])


def test_config_round_trips_through_yaml(tmp_path):
    cfg = resolve_config("supervised-digits", {"optim.lr": 2e-3, "probe.layer": 2})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config_file(tmp_path / "config.yaml")
    assert isinstance(again, Config) and again == cfg


def test_eval_settings_are_nested_per_protocol():
    ov = parse_overrides(["--eval.ood.sets", "noise,svhn", "--eval.generation.samples", "1000",
                          "--eval.calibration.bins", "20", "--eval.finetune.epochs", "3"])
    ev = resolve_config("supervised-digits", ov).eval
    assert ev.ood.sets == ["noise", "svhn"] and ev.generation.samples == 1000
    assert ev.calibration.bins == 20 and ev.finetune.epochs == 3


@pytest.mark.parametrize("key, value, message", [
    ("eval.ood.n", 0, "eval.ood.n must be at least 1, got 0"),
    ("eval.ood.gaussian_covariance", "full", "eval.ood.gaussian_covariance 'full' is unknown; choose shared, class"),
    ("eval.ood.scores", "energy,msq", "eval.ood.scores[1] 'msq' is unknown; choose gaussian, msp, energy"),
    ("eval.calibration.bins", 0, "eval.calibration.bins must be at least 1, got 0"),
    ("eval.generation.extractor", "clip", "eval.generation.extractor 'clip' is unknown; choose inception, classifier"),
    ("eval.generation.samples", 1, "eval.generation.samples must be at least 2, got 1"),
    ("eval.robustness.norms", "l1", "eval.robustness.norms[0] 'l1' is unknown; choose linf, l2"),
    ("eval.lowshot.fractions", "0.1,1.5", "eval.lowshot.fractions[1] must be above 0 and at most 1, got 1.5"),
    ("eval.lowshot.seeds", "0,0", "eval.lowshot.seeds repeats a value"),
    ("eval.lowshot.readout", "knn", "choose linear, finetune"),
    ("eval.probes.solver", "sgd", "eval.probes.solver 'sgd' is unknown; choose lbfgs, adamw"),
    ("eval.protocols", "ood,oodd", "eval.protocols[1] 'oodd' is unknown"),
    ("eval.weights", "last", "eval.weights 'last' is unknown; choose ema, model"),
    ("eval.batch_size", 0, "eval.batch_size must be at least 1, got 0"),
    ("probe.solver", "sgd", "probe.solver 'sgd' is unknown"),
    ("probe.knn_k", 0, "probe.knn_k[0] must be at least 1, got 0"),
])
def test_bad_values_are_one_line_errors_where_the_config_is_built(key, value, message):
    with pytest.raises(GenrepError) as e:
        resolve_config("supervised-digits", {key: value})
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("old, new", [("eval.ood_n", "eval.ood.n"), ("eval.ece_bins", "eval.calibration.bins"),
                                      ("eval.sample_steps", "model.sample_steps"), ("eval.bpd_terms", "model.nll_terms")])
def test_a_version_1_eval_key_says_where_it_went(old, new):
    with pytest.raises(GenrepError) as e:
        resolve_config("supervised-digits", {old: 1})
    assert f"'{old}' is now '{new}'" in str(e.value)


def test_saved_configs_carry_the_current_version(tmp_path):
    from genrep.config import CONFIG_VERSION

    save_config(resolve_config("supervised-digits"), tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["config_version"] == CONFIG_VERSION == 3
