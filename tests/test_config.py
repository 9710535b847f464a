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
    for name in method_names():
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
                          "--eval.lowshot_fractions", "0.01,0.1"])
    cfg = resolve_config("supervised-digits", ov)
    assert cfg.eval.protocols == ["ood", "calibration"] and cfg.probe.knn_k == [5, 10]
    assert cfg.eval.lowshot_fractions == [0.01, 0.1]
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
