"""Config files are read strictly: an unknown key or table, a value of the wrong type or one that would
be coerced with a loss is refused at load, in one line naming the key (issue 23, item 7)."""

import pytest

from hiertrain import config, tierconfig
from hiertrain.errors import ConfigError


GOOD = '[train]\nmodel = "lenet5"\nbatch = 16\nlr = 1\niterations = 5\n[checkpoint]\ndir = "ck"\nevery = 2\n'


def write(tmp_path, broker_dir, body, tier="edge"):
    cfg = tmp_path / f"{tier}.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file(tier)}"\n' + body)
    return cfg


def test_a_good_config_loads_with_its_values_and_an_int_where_a_number_is_asked(tmp_path, broker_dir):
    c = tierconfig.load("edge", write(tmp_path, broker_dir, GOOD))
    assert (c.batch, c.iterations, c.checkpoint_every) == (16, 5, 2)
    assert c.optimizer.lr == 1.0 and type(c.optimizer.lr) is float


@pytest.mark.parametrize("edit,needle", [
    (("iterations = 5", "itertions = 5"), "[train] unknown key 'itertions' (did you mean 'iterations'?)"),
    (("[checkpoint]", "[chekpoint]"), "unknown [chekpoint] (did you mean 'checkpoint'?)"),
    (("batch = 16", "batch = 3.9"), "[train] batch = 3.9 is not an integer"),
    (("iterations = 5", "iterations = true"), "[train] iterations = True is not an integer"),
    (("lr = 1", 'lr = "0.5"'), "[train] lr = '0.5' is not a number"),
    (("every = 2", 'every = "2"'), "[checkpoint] every = '2' is not an integer"),
    (("[train]", 'stray = 1\n[train]'), "unknown key 'stray'"),
    (("[train]", '[runtime]\nthreads = 1.5\n[train]'), "[runtime] threads = 1.5 is not an integer"),
    (("[train]", '[data]\ncompress = "yes"\n[train]'), "[data] compress = 'yes' is not true or false"),
    (("[train]", '[eval]\nholdout = -3\n[train]'), "[eval] holdout = -3 must be >= 0"),
    (("[train]", '[eval]\nsamples = 0\n[train]'), "[eval] samples = 0 must be >= 1"),
    (("[train]", '[runtime]\nkernel_dilation = 0.5\n[train]'), "[runtime] kernel_dilation = 0.5 must be in 1..1000"),
    (("[train]", '[train.inner]\nx = 1\n[train]'), "[train] unknown key 'inner'"),
])
def test_a_misspelt_or_mistyped_key_is_refused_in_one_line_naming_it(tmp_path, broker_dir, edit, needle):
    cfg = write(tmp_path, broker_dir, GOOD.replace(*edit, 1))
    with pytest.raises(ConfigError) as err:
        tierconfig.load("edge", cfg)
    msg = str(err.value)
    assert needle in msg and str(cfg) in msg and "\n" not in msg, msg


def test_the_broker_table_is_strict_too(tmp_path, broker_dir):
    cfg = tmp_path / "x.toml"
    cfg.write_text(f'job = "t"\n[broker]\ncredentials = "{broker_dir.credentials_file("edge")}"\nprot = 1884\n')
    with pytest.raises(ConfigError, match=r"\[broker\] unknown key 'prot' \(did you mean 'port'\?\)"):
        config.load(cfg)


def test_a_planner_config_is_strict(tmp_path, broker_dir):
    from hiertrain.planner.service import state_from_config

    cfg = write(tmp_path, broker_dir, "[planner]\nbatch = 8\nhysterisis = 0.3\n", tier="planner")
    with pytest.raises(ConfigError, match="unknown key 'hysterisis' \\(did you mean 'hysteresis'\\?\\)"):
        state_from_config(config.load(cfg))
    cfg.write_text(cfg.read_text().replace("hysterisis = 0.3", "bw_device_edge = 5"))
    assert state_from_config(config.load(cfg)).batch == 8
    cfg.write_text(cfg.read_text().replace("batch = 8", "batch = 8.5"))
    with pytest.raises(ConfigError, match=r"\[planner\] batch = 8.5 is not an integer"):
        state_from_config(config.load(cfg))
