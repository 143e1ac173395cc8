"""Intel calibrator.py's flags with Intel's meanings (scripts/calibrator.py :595-790):
-ss/--sampling_single, -uff/--disable_force_fp32, -ucac/--disable_cac_unify, -clx/--is_clx
as plain switches, -i/-s that are not integers, and our own search switches' long names."""

from __future__ import annotations

import json

from calibrator.caffe.prototxt import read_net
from calibrator.cli.calibrate_cmd import build_parser, run_config
from tests.test_quant_outputs import make_model, run_main


def config_of(*argv):
    return run_config(build_parser().parse_args(["-m", "m.prototxt", "-w", "w.caffemodel",
                                                 *argv]))


def test_intel_switches_and_their_meanings():
    config = config_of("-ss", "-uff", "-ucac", "-clx", "-1st", "-fu")
    options = config.quant
    assert config.sampling_single
    assert not options.force_fp32_rule and not options.cac_rule
    assert options.cascade_lake and options.force_u8 and options.first_conv
    long = config_of("--sampling_single", "--disable_force_fp32", "--disable_cac_unify",
                     "--is_clx")
    assert long.sampling_single and long.quant.cascade_lake
    assert not long.quant.force_fp32_rule and not long.quant.cac_rule
    default = config_of()
    assert not default.sampling_single and default.quant.force_fp32_rule
    assert default.quant.cac_rule and not default.quant.cascade_lake
    assert default.search.scale_search and default.search.allow_fp32
    ours = config_of("--no-scale-search", "--no-fp32-fallback")
    assert not ours.search.scale_search and not ours.search.allow_fp32


def test_iterations_that_are_not_integers_become_intels_defaults(caplog):
    config = config_of("-i", "ten", "-s", "2.5")
    err = caplog.text  # a held warning: the CLI prints it when the command ends
    assert config.iterations == 1000 and config.sampling_iterations == 10
    assert "1000" in err and "10" in err
    assert config_of("-i", "7").iterations == 7


def test_iterations_below_one_are_refused(capsys, tmp_path):
    code, _, err = run_main(capsys, ["-m", tmp_path / "m", "-w", tmp_path / "w", "-i", "0"])
    assert code == 2 and "-i/--iterations must be at least 1" in err


def test_sampling_single_takes_the_last_batch_only(capsys, tmp_path):
    prototxt, caffemodel = make_model(tmp_path / "all", images=8)
    code, _, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "--quiet", "-s",
                                     "2", "-ss", "-a", "DIRECT", "--json", tmp_path / "ss.json"])
    assert code == 0, err
    # the same net whose list holds only the images of batch 1 (the last of -s 2)
    lines = (tmp_path / "all" / "list.txt").read_text().splitlines(keepends=True)
    (tmp_path / "all" / "list.txt").write_text("".join(lines[4:8]))
    code, _, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "--quiet", "-s",
                                     "1", "-a", "DIRECT", "--json", tmp_path / "last.json"])
    assert code == 0, err
    (tmp_path / "all" / "list.txt").write_text("".join(lines))
    code, _, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "--quiet", "-s",
                                     "2", "-a", "DIRECT", "--json", tmp_path / "both.json"])
    assert code == 0, err

    def thresholds(path):
        return {l["name"]: (l["input_threshold"], l["output_threshold"])
                for l in json.loads(path.read_text())["layers"] if "input_threshold" in l}

    assert thresholds(tmp_path / "ss.json") == thresholds(tmp_path / "last.json")
    assert thresholds(tmp_path / "ss.json") != thresholds(tmp_path / "both.json")


def test_an_intel_command_line_runs(capsys, tmp_path):
    prototxt, caffemodel = make_model(tmp_path)
    code, out, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "-s", "2", "-ss",
                                       "-uff", "-ucac", "--is_clx", "-1st", "-fu", "-a", "DIRECT",
                                       "-i", "x", "--quiet"])
    assert code == 0, err
    written = read_net(tmp_path / "net_quantized.prototxt")
    params = {l.name: l.quantization_param for l in written.layer
              if l.HasField("quantization_param")}
    assert params["conv4"].bw_layer_out == 8      # -uff: the last conv keeps INT8 too
    forced = read_net(tmp_path / "net_quantized_force_u8.prototxt")
    conv1 = next(l for l in forced.layer if l.name == "conv1").quantization_param
    assert conv1.force_u8_input and list(conv1.scale_params) == list(params["conv1"].scale_params)
    assert (tmp_path / "net_new.caffemodel").exists()


def test_the_default_warning_waits_for_the_end_of_the_command(capsys, tmp_path):
    """Held like every warning: printed when the command succeeds, dropped when it fails
    (whose one line is then all of stderr)."""
    prototxt, caffemodel = make_model(tmp_path)
    code, _, err = run_main(capsys, ["-m", prototxt, "-w", caffemodel, "-q", "-s", "1", "-a",
                                     "DIRECT", "-i", "x", "--quiet"])
    assert code == 0 and "set to the default value 1000" in err
    code, _, err = run_main(capsys, ["-m", tmp_path / "missing.prototxt", "-w", caffemodel,
                                     "-i", "x"])
    assert code == 2 and err.count("\n") == 1 and err.startswith("calibrator: error:"), err
