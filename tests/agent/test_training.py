"""Local training: the trainer interface, both backends, and LiteRT without TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.training import (
    TRAINER_KINDS,
    KerasTrainer,
    LiteRTTrainer,
    TrainConfig,
    Trainer,
    TrainReport,
    available_trainers,
    build_keras_model,
    make_trainer,
)
from coordinator.models import MODEL_NAMES, get_model_definition
from coordinator.reference import DigitsSplit, load_digits_split
from coordinator.tflite_export import export_float_tflite
from protocol.errors import ConfigError, ModelError
from runtime.architectures import ARCHITECTURE_NAMES
from tests.coordinator.test_trainable import exported_trainable

REPO_ROOT = Path(__file__).resolve().parents[2]
BATCH = 16
SUBPROCESS_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split()


def _litert(name: str = "digits_mlp") -> LiteRTTrainer:
    return LiteRTTrainer(exported_trainable(name), batch_size=BATCH)


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b, strict=True))))


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


# --- config and report -----------------------------------------------------------------


def test_train_config_defaults_are_the_reference_workload() -> None:
    config = TrainConfig()
    assert dataclasses.astuple(config) == (1, 16, 0.05, 0.0, 0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.epochs = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("proximal_mu", -0.1),
        ("proximal_mu", 40.0),  # lr * mu = 2: the proximal step no longer converges
        ("seed", -1),
        ("validation_fraction", 1.0),
        ("validation_fraction", -0.1),
    ],
)
def test_train_config_refuses_values_that_cannot_work(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        TrainConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.reason == "bad_train_config"


def test_report_counts_examples_and_steps_with_a_short_last_batch(split: DigitsSplit) -> None:
    trainer = _litert()
    report = trainer.train(split.x_train[:40], split.y_train[:40], TrainConfig(epochs=2))
    assert isinstance(report, TrainReport)
    assert report.num_examples == 40
    assert report.steps == 2 * 3  # 16 + 16 + 8 per epoch
    assert 0.0 < report.loss < 5.0
    assert report.val_accuracy is None
    assert report.val_loss is None
    assert report.seconds >= 0.0


def test_fewer_examples_than_one_batch_still_train(split: DigitsSplit) -> None:
    trainer = _litert()
    before = trainer.get_weights()
    report = trainer.train(split.x_train[:3], split.y_train[:3], TrainConfig())
    assert (report.num_examples, report.steps) == (3, 1)
    assert _max_diff(trainer.get_weights(), before) > 0.0


# --- determinism, validation, FedProx --------------------------------------------------


def test_training_is_deterministic_for_a_seed(split: DigitsSplit) -> None:
    x, y = split.x_train[:200], split.y_train[:200]
    results = []
    for seed in (5, 5, 6):
        trainer = _litert()
        trainer.train(x, y, TrainConfig(epochs=2, seed=seed))
        results.append(trainer.get_weights())
    assert _max_diff(results[0], results[1]) == 0.0
    assert _max_diff(results[0], results[2]) > 1e-4


def test_validation_hold_out_is_the_documented_deterministic_one(split: DigitsSplit) -> None:
    x, y = split.x_train[:100], split.y_train[:100]
    config = TrainConfig(epochs=2, seed=9, validation_fraction=0.2)
    trainer = _litert()
    report = trainer.train(x, y, config)
    assert report.num_examples == 80
    assert report.steps == 2 * 5
    held_out = np.random.default_rng(9).permutation(100)[80:]
    loss, accuracy = trainer.evaluate(x[held_out], y[held_out])
    assert report.val_loss == pytest.approx(loss)
    assert report.val_accuracy == pytest.approx(accuracy)
    # The held-out examples take no part in training: changing their labels changes nothing.
    relabelled = y.copy()
    relabelled[held_out] = (relabelled[held_out] + 1) % 10
    other = _litert()
    other.train(x, relabelled, config)
    assert _max_diff(other.get_weights(), trainer.get_weights()) == 0.0


def test_fedprox_pulls_weights_toward_the_global_ones(split: DigitsSplit) -> None:
    x, y = split.x_train[:320], split.y_train[:320]
    moved = {}
    for mu in (0.0, 1.0, 30.0):
        trainer = _litert()
        start = trainer.get_weights()
        trainer.train(x, y, TrainConfig(epochs=3, proximal_mu=mu))
        moved[mu] = _distance(trainer.get_weights(), start)
    assert moved[0.0] > moved[1.0] > moved[30.0]
    # lr * mu = 1.5: every step ends within about one gradient step of the global weights.
    assert moved[30.0] < 0.25 * moved[0.0]


def test_fedprox_is_the_same_on_both_backends(split: DigitsSplit) -> None:
    x, y = split.x_train[:150], split.y_train[:150]
    config = TrainConfig(epochs=2, proximal_mu=2.0, seed=4)
    litert = _litert("digits_mlp")
    keras = KerasTrainer(lambda: build_keras_model("digits_mlp"))
    # Start away from the global weights' own path so the proximal term matters.
    litert.train(x, y, TrainConfig(seed=1))
    keras.set_weights(litert.get_weights())
    litert_report = litert.train(x, y, config)
    keras_report = keras.train(x, y, config)
    assert _max_diff(litert.get_weights(), keras.get_weights()) < 1e-5
    assert litert_report.loss == pytest.approx(keras_report.loss, abs=1e-5)


# --- both backends ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keras_and_litert_backends_take_the_same_steps(name: str, split: DigitsSplit) -> None:
    litert = _litert(name)
    keras = KerasTrainer(lambda: build_keras_model(name))
    assert _max_diff(litert.get_weights(), keras.get_weights()) == 0.0
    config = TrainConfig(epochs=1, seed=2, validation_fraction=0.1)
    litert_report = litert.train(split.x_train, split.y_train, config)
    keras_report = keras.train(split.x_train, split.y_train, config)
    # 76 steps of float32 arithmetic summed in different orders drift apart a little.
    assert _max_diff(litert.get_weights(), keras.get_weights()) < 1e-3
    assert (litert_report.num_examples, litert_report.steps) == (
        keras_report.num_examples,
        keras_report.steps,
    )
    assert litert_report.val_accuracy == pytest.approx(keras_report.val_accuracy, abs=1e-6)


def test_keras_backend_trains_the_cnn(split: DigitsSplit) -> None:
    trainer = make_trainer("keras", model_name="digits_cnn")
    assert isinstance(trainer, KerasTrainer)
    assert trainer.fixed_batch_size is None
    _, before = trainer.evaluate(split.x_test, split.y_test)
    report = trainer.train(split.x_train, split.y_train, TrainConfig(epochs=4, batch_size=20))
    loss, after = trainer.evaluate(split.x_test, split.y_test)
    assert report.steps == 4 * -(-len(split.x_train) // 20)
    assert before < 0.2
    assert after > 0.75
    assert loss < 1.0


def test_evaluate_and_predict_agree(split: DigitsSplit) -> None:
    trainer: Trainer = _litert("digits_cnn")
    trainer.train(split.x_train, split.y_train, TrainConfig(epochs=2))
    probs = trainer.predict(split.x_test)
    assert probs.shape == (len(split.x_test), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    loss, accuracy = trainer.evaluate(split.x_test, split.y_test)
    assert accuracy == pytest.approx(np.mean(probs.argmax(axis=1) == split.y_test))
    picked = probs[np.arange(len(probs)), split.y_test]
    assert loss == pytest.approx(-np.mean(np.log(picked)), rel=1e-5)


@pytest.mark.parametrize("name", ARCHITECTURE_NAMES)
def test_agent_builders_match_the_coordinator_registry(name: str, split: DigitsSplit) -> None:
    agent_model = build_keras_model(name)
    coordinator_model = get_model_definition(name).build_keras()
    assert [type(layer).__name__ for layer in agent_model.layers] == [
        type(layer).__name__ for layer in coordinator_model.layers
    ]
    agent_weights = agent_model.get_weights()
    assert _max_diff(agent_weights, coordinator_model.get_weights()) == 0.0
    rng = np.random.default_rng(0)
    other = [rng.normal(0.0, 0.3, w.shape).astype(np.float32) for w in agent_weights]
    agent_model.set_weights(other)
    coordinator_model.set_weights(other)
    np.testing.assert_allclose(
        agent_model.predict(split.x_test, verbose=0),
        coordinator_model.predict(split.x_test, verbose=0),
        atol=1e-6,
    )
    assert ARCHITECTURE_NAMES == MODEL_NAMES


# --- errors ----------------------------------------------------------------------------


def test_available_trainers_here() -> None:
    assert available_trainers() == list(TRAINER_KINDS)


def test_make_trainer_errors() -> None:
    with pytest.raises(ConfigError, match="litert, keras") as info:
        make_trainer("pytorch", model_name="digits_cnn")
    assert info.value.reason == "bad_trainer"
    with pytest.raises(ConfigError, match=r"trainable \.tflite"):
        make_trainer("litert")
    with pytest.raises(ConfigError, match="model name"):
        make_trainer("keras")
    with pytest.raises(ConfigError, match="digits_cnn, digits_mlp") as unknown:
        make_trainer("keras", model_name="resnet")
    assert unknown.value.reason == "unknown_model"
    with pytest.raises(ConfigError, match="batches of 16, not 8") as batch:
        make_trainer("litert", trainable_tflite=exported_trainable("digits_mlp"), batch_size=8)
    assert batch.value.reason == "bad_batch_size"
    assert (
        make_trainer("litert", trainable_tflite=exported_trainable("digits_mlp")).name == "litert"
    )


def test_litert_refuses_models_it_cannot_train() -> None:
    with pytest.raises(ModelError) as garbage:
        LiteRTTrainer(b"not a model at all", batch_size=BATCH)
    assert garbage.value.reason == "bad_model"
    inference_only = export_float_tflite(get_model_definition("digits_mlp").build_keras())
    with pytest.raises(ModelError, match="signatures") as plain:
        LiteRTTrainer(inference_only, batch_size=BATCH)
    assert plain.value.reason == "not_trainable"


def test_bad_inputs_labels_weights_and_batch_size(split: DigitsSplit) -> None:
    trainer = _litert()
    x, y = split.x_train[:32], split.y_train[:32]
    with pytest.raises(ConfigError, match="exactly 16") as batch:
        trainer.train(x, y, TrainConfig(batch_size=32))
    assert batch.value.reason == "bad_batch_size"
    with pytest.raises(ModelError, match="do not fit") as shape:
        trainer.train(x.reshape(32, 64), y, TrainConfig())
    assert shape.value.reason == "bad_input_shape"
    with pytest.raises(ModelError) as empty:
        trainer.train(x[:0], y[:0], TrainConfig())
    assert empty.value.reason == "bad_input_shape"
    with pytest.raises(ModelError, match=r"0\.\.9") as labels:
        trainer.train(x, y + 5, TrainConfig())
    assert labels.value.reason == "bad_labels"
    with pytest.raises(ModelError, match="integers"):
        trainer.train(x, y.astype(np.float32), TrainConfig())
    with pytest.raises(ModelError, match="do not fit") as weights:
        trainer.set_weights(trainer.get_weights()[:-1])
    assert weights.value.reason == "bad_weights"
    keras = KerasTrainer(lambda: build_keras_model("digits_mlp"))
    with pytest.raises(ModelError, match="do not fit"):
        keras.set_weights([w.T for w in keras.get_weights()])


# --- LiteRT without TensorFlow ---------------------------------------------------------

_NO_TENSORFLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from importlib.abc import MetaPathFinder

    class NoTensorFlow(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tensorflow", "keras", "tf_keras"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())

    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from agent.training import LiteRTTrainer, TrainConfig, available_trainers

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    with open(sys.argv[1], "rb") as fh:
        trainer = LiteRTTrainer(fh.read(), batch_size=16)
    before_loss, before = trainer.evaluate(x_test, y_test)
    report = trainer.train(x_train, y_train, TrainConfig(epochs=2))
    after_loss, after = trainer.evaluate(x_test, y_test)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    print(json.dumps({
        "before": before,
        "after": after,
        "before_loss": before_loss,
        "after_loss": after_loss,
        "steps": report.steps,
        "loaded": loaded,
        "available": available_trainers(),
    }))
    """
)


def test_litert_trainer_trains_where_tensorflow_cannot_be_imported(tmp_path: Path) -> None:
    model_path = tmp_path / "digits_cnn.trainable.tflite"
    model_path.write_bytes(exported_trainable("digits_cnn"))
    result = subprocess.run(
        [sys.executable, "-c", _NO_TENSORFLOW_SCRIPT, str(model_path)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["loaded"] == []
    assert outcome["available"] == ["litert"]
    assert outcome["steps"] == 2 * -(-1347 // BATCH)
    assert outcome["before"] < 0.2
    # Two epochs of plain SGD are early days for this model (five reach 0.9).
    assert outcome["after"] > outcome["before"] + 0.2
    assert outcome["after_loss"] < outcome["before_loss"] - 0.3
