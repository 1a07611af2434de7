import json

from rlds.cli import main


def test_eval_writes_figures_and_report_for_base_and_checkpoint(tmp_path, monkeypatch):
    from rlds.checkpoint import save_checkpoint
    from rlds.checkpoint import trainable_bytes
    from rlds.config import ModelConfig
    from rlds.policy import load_policy

    # a "checkpoint" of the tiny model with every trained weight nudged
    policy = load_policy(ModelConfig())
    for p in policy.unet.parameters():
        p.data.mul_(1.01)
    ckpt = save_checkpoint(tmp_path / "ckpt", trainable_bytes(policy.unet), b"", {"iteration": 1})
    args = ["eval", "configs/tiny.yaml", "sampling.num_steps=3", "algo.timesteps_per_iteration=2", "--composition-prompts", "4",
            "--composition-seeds", "3", "--group-size", "2", "--out", str(tmp_path / "eval"), "--checkpoint", str(ckpt)]
    assert main(args) == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    for model in ("base", "tuned"):
        r = results[model]
        comp = r["composition"]
        assert 0 <= comp["accuracy"] <= 1 and comp["prompts"] == 4 and comp["seeds"] == 3
        # the standard error of 4 prompts x 3 seeds = 12 images
        assert abs(comp["accuracy_se"] - (comp["accuracy"] * (1 - comp["accuracy"]) / 12) ** 0.5) < 1e-9
        assert 0 <= r["fairness"]["statistical_parity"] <= 1 and r["fairness"]["group_size"] == 2
        assert 0 <= r["fairness"]["training_prompts"]["statistical_parity"] <= 1
        per_prompt = r["fairness"]["per_prompt"]  # the held-out colour-free prompts, one figure each
        assert len(per_prompt) == r["fairness"]["prompts"]
        assert abs(sum(per_prompt) / len(per_prompt) - r["fairness"]["statistical_parity"]) < 1e-9
        assert r["fairness"]["statistical_parity_se"] >= 0
        assert 0 <= r["quality"]["mean"] <= 1 and 0 <= r["quality"]["named_colours"]["mean"] <= 1
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| composition accuracy ± s.e." in report and "composition_tuned.png" in report
    assert f"{results['base']['composition']['accuracy_se']:.1%} |" in report.split("| composition mean")[0]
    assert "| statistical parity ± s.e. (training prompts" in report
    held_out_row = report.split("| statistical parity ± s.e. over prompts")[1].split("\n")[0]
    assert held_out_row.endswith(f"{results['tuned']['fairness']['statistical_parity_se']:.4f} |")
    assert (tmp_path / "eval" / "fairness_base.png").is_file()
    assert 0 <= results["tuned"]["single_object"]["accuracy"] <= 1
    # the base model's figures are cached: a second evaluation reuses them, grids included
    def no_sampling(*args, **kwargs):
        raise AssertionError("the base model was evaluated again")

    monkeypatch.setattr("rlds.eval.evaluate_policy", no_sampling)
    assert main(args[:-4] + ["--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "eval.json").read_text())
    assert again["base"] == results["base"] and (tmp_path / "again" / "composition_base.png").is_file()


def test_eval_refuses_a_count_below_one(capsys):
    import pytest

    for flag in ("--composition-seeds", "--composition-prompts", "--group-size"):
        with pytest.raises(SystemExit):
            main(["eval", "configs/tiny.yaml", flag, "0"])
        assert f"{flag}: 0 is not a positive whole number" in capsys.readouterr().err


def test_a_model_folder_ships_its_base_evaluation_wherever_it_is_copied(tmp_path, monkeypatch):
    """`rlds eval --model-card` leaves the base figures in the model folder, keyed by the weights'
    contents (not the folder's place or file times): a copy elsewhere evaluates only the tuned model."""
    import shutil

    from rlds.config import ModelConfig
    from rlds.policy import load_policy
    from rlds.policy.pipeline import save_policy
    from rlds.pretrain import EVAL_END, EVAL_START

    folder = tmp_path / "model"
    save_policy(load_policy(ModelConfig()), folder)
    (folder / "README.md").write_text(f"# a model\n\n{EVAL_START}\n{EVAL_END}\n")
    small = ["sampling.num_steps=3", "algo.timesteps_per_iteration=2", "--composition-prompts", "2",
             "--composition-seeds", "1", "--group-size", "2"]
    assert main(["eval", "configs/tiny.yaml", f"model.source={folder}", *small, "--out", str(tmp_path / "e1"),
                 "--model-card"]) == 0
    assert list((folder / "eval").glob("base-*/figures.json")) and "composition accuracy" in (
        folder / "README.md").read_text()
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, copy)  # new place, new file times
    monkeypatch.setenv("RLDS_CACHE", str(tmp_path / "empty-cache"))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the base model was evaluated again")

    monkeypatch.setattr("rlds.eval.evaluate_policy", no_sampling)
    assert main(["eval", "configs/tiny.yaml", f"model.source={copy}", *small, "--out", str(tmp_path / "e2")]) == 0
    first, again = (json.loads((tmp_path / e / "eval.json").read_text()) for e in ("e1", "e2"))
    assert again["base"] == first["base"]


def test_every_eval_image_has_its_own_seed_and_base_and_tuned_share_them(monkeypatch):
    """A seed shared by every colour-free prompt moves all their figures with one noise draw, which
    the standard error over prompts cannot show; each image gets its own, the same for every model."""
    import rlds.eval as ev
    from rlds.config import ModelConfig
    from rlds.configure import load_config
    from rlds.policy import load_policy

    drawn = []
    sample = ev._images

    def recording(policy, prompts, seeds, *args, **kwargs):
        drawn.append(list(seeds))
        return sample(policy, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(ev, "_images", recording)
    config = load_config("configs/tiny.yaml", ("sampling.num_steps=2", "algo.timesteps_per_iteration=2"))
    for _ in range(2):  # two models' evaluations
        ev.evaluate_policy(load_policy(ModelConfig()), config, composition_prompts=3, composition_seeds=2,
                           fairness_group=3, single_seeds=2, progress=False)
    first, second = drawn[:len(drawn) // 2], drawn[len(drawn) // 2:]
    assert first == second
    seeds = [s for part in first for s in part]
    assert len(seeds) == len(set(seeds)) > 0
