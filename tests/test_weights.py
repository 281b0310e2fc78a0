"""vthcl.weights and vthcl.export: PySlowFast / pytorchvideo layouts, ImageNet inflation, strict loading."""
from __future__ import annotations

import logging
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from vthcl import weights
from vthcl.eval import load_encoder
from vthcl.export import export
from vthcl.export import main as export_main
from vthcl.model import Pathway


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """R50 forwards on tiny inputs: one intra-op thread, since on a busy
    two-core machine more threads mostly wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(state: dict, seed: int) -> dict:
    """Random values for every float tensor of a state dict, BN stats included
    (variances positive), scaled so a deep net's activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = torch.randint(0, 1000, v.shape, generator=g, dtype=v.dtype)
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean"):
            out[k] = torch.randn(v.shape, generator=g) * 0.1
        elif v.dim() == 1 and k.endswith("weight"):
            out[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.5
        elif v.dim() == 1:
            out[k] = torch.randn(v.shape, generator=g) * 0.1
        else:  # He-scaled conv / linear weights
            fan_in = v[0].numel()
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    return out


def our_state(arch: str, width: int, seed: int = 0) -> dict:
    return randomise(Pathway(arch, width).state_dict(), seed)


# ----------------------------------------------------------------------------- PySlowFast
def pyslowfast_slow_r50_shapes(width: int = 64, classes: int = 400) -> dict[str, tuple]:
    """Key -> shape of PySlowFast's Slow R50 (MODEL.ARCH slow, RESNET.DEPTH 50,
    configs/Kinetics/SLOW_8x8_R50.yaml), written out from its code:

    * video_model_builder.ResNet._construct_network: s1 = VideoModelStem with
      kernel [1, 7, 7] (_TEMPORAL_KERNEL_BASIS["slow"][0]); s2..s5 = ResStage
      with dim_out 4w, 8w, 16w, 32w and dim_inner w, 2w, 4w, 8w (NUM_GROUPS 1,
      WIDTH_PER_GROUP w), temporal kernels 1, 1, 3, 3 for every block
      (NUM_BLOCK_TEMP_KERNEL [[3], [4], [6], [3]]); head = ResNetBasicHead
      whose nn.Linear is "projection".
    * stem_helper.VideoModelStem: "pathway0_stem" = ResNetBasicStem(conv, bn).
    * resnet_helper.ResStage: "pathway0_res{i}" = ResBlock, with "branch1" +
      "branch1_bn" when dim_in != dim_out or stride != 1, and "branch2" =
      BottleneckTransform(a [T,1,1], a_bn, b [1,3,3], b_bn, c [1,1,1], c_bn).
    """
    shapes: dict[str, tuple] = {}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    shapes["s1.pathway0_stem.conv.weight"] = (width, 3, 1, 7, 7)
    bn("s1.pathway0_stem.bn", width)
    dim_in = width
    for stage, (blocks, t) in enumerate(zip((3, 4, 6, 3), (1, 1, 3, 3)), start=2):
        inner, out = width * 2 ** (stage - 2), width * 4 * 2 ** (stage - 2)
        for i in range(blocks):
            p = f"s{stage}.pathway0_res{i}"
            cin = dim_in if i == 0 else out
            if i == 0:
                shapes[f"{p}.branch1.weight"] = (out, cin, 1, 1, 1)
                bn(f"{p}.branch1_bn", out)
            shapes[f"{p}.branch2.a.weight"] = (inner, cin, t, 1, 1)
            bn(f"{p}.branch2.a_bn", inner)
            shapes[f"{p}.branch2.b.weight"] = (inner, inner, 1, 3, 3)
            bn(f"{p}.branch2.b_bn", inner)
            shapes[f"{p}.branch2.c.weight"] = (out, inner, 1, 1, 1)
            bn(f"{p}.branch2.c_bn", out)
        dim_in = out
    shapes["head.projection.weight"] = (classes, width * 32)
    shapes["head.projection.bias"] = (classes,)
    return shapes


def test_pyslowfast_round_trip_is_exact():
    state = our_state("r50", 8)
    theirs = weights.to_pyslowfast(state)
    assert theirs.keys().isdisjoint(state)
    back = weights.from_pyslowfast(theirs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


def test_pyslowfast_names_and_shapes_match_their_resnet(caplog):
    ours = Pathway("r50", 64).state_dict()
    expected = pyslowfast_slow_r50_shapes(64)
    exported = weights.to_pyslowfast(ours)
    encoder_keys = {k for k in expected if not k.startswith("head.")}
    assert set(exported) == encoder_keys
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: expected[k] for k in encoder_keys}
    # a zoo-like model_state (with its classifier) loads into our encoder, the head dropped and logged
    zoo = randomise({k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float32)
                     for k, s in pyslowfast_slow_r50_shapes(8, classes=7).items()}, seed=3)
    with caplog.at_level(logging.INFO, logger="vthcl.weights"):
        mine = weights.from_pyslowfast(zoo)
    assert "head.projection.weight" in caplog.text and "dropped 2" in caplog.text
    encoder = weights.load_pathway(Pathway("r50", 8), mine, "zoo")
    assert torch.equal(encoder.res3[0].short[0].weight, zoo["s3.pathway0_res0.branch1.weight"])
    assert torch.equal(encoder.res5[2].c_bn.running_var, zoo["s5.pathway0_res2.branch2.c_bn.running_var"])


# ----------------------------------------------------------------------------- pytorchvideo
@pytest.fixture(scope="module")
def slow_r50():
    """pytorchvideo's hub slow_r50 builder. Its models package imports
    torchvision.ops (RoIAlign, for detection heads) and torchvision does not
    import beside this torch: a stand-in serves that import, in this process
    and only while pytorchvideo is imported."""
    pytest.importorskip("pytorchvideo", reason="pytorchvideo is not installed (pip install -e .[dev])")
    with pytest.MonkeyPatch.context() as mp:
        if "torchvision" not in sys.modules:
            tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
            ops.RoIAlign = type("RoIAlign", (torch.nn.Module,), {})
            tv.ops = ops
            mp.setitem(sys.modules, "torchvision", tv)
            mp.setitem(sys.modules, "torchvision.ops", ops)
        with warnings.catch_warnings():  # its import-time torch.jit.script calls warn of deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            from pytorchvideo.models.hub.resnet import slow_r50
    return slow_r50


def test_pytorchvideo_round_trip_is_exact():
    state = our_state("r50", 8, seed=1)
    theirs = weights.to_pytorchvideo(state)
    assert theirs.keys().isdisjoint(state)
    back = weights.from_pytorchvideo(theirs)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_pytorchvideo_slow_r50_gives_our_features(slow_r50, caplog):
    torch.manual_seed(0)
    net = slow_r50(pretrained=False).eval()
    net.load_state_dict(randomise(net.state_dict(), seed=2))
    with caplog.at_level(logging.INFO, logger="vthcl.weights"):
        state = weights.from_pytorchvideo(net.state_dict())
    assert "blocks.5.proj.weight" in caplog.text
    encoder = weights.load_pathway(Pathway("r50", 64).eval(), state, "slow_r50")
    exported = weights.to_pytorchvideo(encoder.state_dict())
    assert exported.keys() == {k for k in net.state_dict() if not k.startswith("blocks.5.")}
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        theirs = x
        for block in net.blocks[:5]:  # the stem and the four stages; blocks[5] is the head
            theirs = block(theirs)
        ours = encoder(x)["res5"]
    assert ours.shape == theirs.shape == (1, 2048, 8, 1, 1)
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pytorchvideo_ptvresnet_and_ddp_prefixes_are_removed():
    state = our_state("r50", 8, seed=5)
    theirs = weights.to_pytorchvideo(state)
    for prefix in ("model.", "module.", "module.model."):
        back = weights.from_pytorchvideo({prefix + k: v for k, v in theirs.items()})
        assert back.keys() == state.keys()


# ----------------------------------------------------------------------------- ImageNet inflation
def torchvision_resnet_state(arch: str, seed: int) -> dict:
    """A torchvision ResNet-18/50 state dict (torchvision/models/resnet.py's
    layer names and shapes) with random values and BN statistics."""
    bottleneck = arch == "r50"
    shapes: dict[str, tuple] = {}

    def bn(prefix, c):
        shapes.update({f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                       f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()})

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3) if bottleneck else (2, 2, 2, 2),
                                                 (64, 128, 256, 512)), start=1):
        out = planes * (4 if bottleneck else 1)
        for j in range(blocks):
            p, cin = f"layer{layer}.{j}", inplanes if j == 0 else out
            if bottleneck:
                shapes[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                shapes[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                bn(f"{p}.bn1", planes), bn(f"{p}.bn2", planes), bn(f"{p}.bn3", out)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn1", planes), bn(f"{p}.bn2", planes)
            if j == 0 and (layer > 1 or cin != out):
                shapes[f"{p}.downsample.0.weight"] = (out, cin, 1, 1)
                bn(f"{p}.downsample.1", out)
        inplanes = out
    shapes["fc.weight"], shapes["fc.bias"] = (1000, inplanes), (1000,)
    return randomise({k: torch.zeros(s, dtype=torch.long if k.endswith("tracked") else torch.float32)
                      for k, s in shapes.items()}, seed)


def resnet_2d(sd: dict, x: torch.Tensor, bottleneck: bool) -> dict[str, torch.Tensor]:
    """torchvision's ResNet forward, layer by layer, on [B, 3, H, W]: the layer2..4 maps."""
    def bn(y, p):
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    y = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    maps = {}
    for layer in range(1, 5):
        j = 0
        while f"layer{layer}.{j}.conv1.weight" in sd:
            p = f"layer{layer}.{j}"
            stride = 2 if (j == 0 and layer > 1) else 1
            if bottleneck:
                z = F.relu(bn(F.conv2d(y, sd[f"{p}.conv1.weight"]), f"{p}.bn1"))
                z = F.relu(bn(F.conv2d(z, sd[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                z = bn(F.conv2d(z, sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            else:
                z = F.relu(bn(F.conv2d(y, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                z = bn(F.conv2d(z, sd[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                y = bn(F.conv2d(y, sd[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            y = F.relu(z + y)
            j += 1
        maps[f"res{layer + 1}"] = y
    return maps


@pytest.mark.parametrize("arch", ["r18", "r50"])
def test_inflated_resnet_gives_the_2d_response_on_a_still_video(arch, caplog):
    sd = torchvision_resnet_state(arch, seed=6)
    with caplog.at_level(logging.INFO, logger="vthcl.weights"):
        state = weights.inflate_2d(sd, arch)
    assert "fc.weight" in caplog.text
    encoder = weights.load_pathway(Pathway(arch, 64).eval(), state, f"inflated {arch}")
    # a kernel of temporal size 3 sees zero padding at a clip's ends: frame i of a
    # level is exact when i >= (the temporal convs up to it) from both ends
    temporal = {lvl: sum(1 for k, v in state.items() if v.dim() == 5 and v.shape[2] == 3
                         and int(k[3]) <= int(lvl[3])) for lvl in ("res3", "res4", "res5")}
    assert temporal["res3"] == 0 and temporal["res5"] == (9 if arch == "r50" else 4)
    frames = 2 * temporal["res5"] + 1
    frame = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = resnet_2d(sd, frame, arch == "r50")
        got = encoder(frame[:, :, None].expand(-1, -1, frames, -1, -1).contiguous())
    for lvl in ("res3", "res4", "res5"):
        lo = temporal[lvl]
        assert ref[lvl].abs().max() > 0.1
        for i in range(lo, frames - lo):
            torch.testing.assert_close(got[lvl][:, :, i], ref[lvl], rtol=1e-4, atol=1e-4)
    # at the clip's ends the cut kernels give another response: the check above is not vacuous
    assert not torch.allclose(got["res5"][:, :, 0], ref["res5"], rtol=1e-3, atol=1e-3)


def test_inflation_refuses_the_other_block_type_and_fills_old_bn_counters():
    sd = torchvision_resnet_state("r18", seed=8)
    with pytest.raises(ValueError, match="basic-block .* does not inflate to r50"):
        weights.inflate_2d(sd, "r50")
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}  # as torchvision's first files
    state = weights.inflate_2d(old, "r18")
    assert state["res3.0.short.1.num_batches_tracked"].item() == 0
    weights.load_pathway(Pathway("r18", 64), state, "old")


# ----------------------------------------------------------------------------- loading and refusals
def test_load_pathway_names_missing_unexpected_and_misshapen_keys():
    state = our_state("r50", 8)
    state.pop("res2.0.a.weight")
    state.pop("res5.2.c_bn.bias")
    state["s1.pathway1_stem.conv.weight"] = torch.zeros(1)
    state["stem.0.weight"] = torch.zeros(8, 3, 5, 7, 7)
    with pytest.raises(weights.WeightsMismatch) as e:
        weights.load_pathway(Pathway("r50", 8), state, "pyslowfast:/x/slowfast.pyth")
    msg = str(e.value)
    assert msg.startswith("pyslowfast:/x/slowfast.pyth: does not fit the r50 slow encoder")
    assert "2 missing keys (res2.0.a.weight, res5.2.c_bn.bias)" in msg
    assert "1 unexpected keys (s1.pathway1_stem.conv.weight)" in msg
    assert "stem.0.weight [8, 3, 5, 7, 7] vs [8, 3, 1, 7, 7]" in msg
    many = {f"extra.{i}": torch.zeros(1) for i in range(12)}
    with pytest.raises(weights.WeightsMismatch, match=r"12 unexpected keys \(extra.0, .*\(\+7 more\)"):
        weights.load_pathway(Pathway("r18", 8), {**Pathway("r18", 8).state_dict(), **many}, "f")


def vthcl_checkpoint(path, arch: str, width: int, seed: int = 0):
    """A last.pt as vthcl.train writes it: config and the model's "slow." keys."""
    state = our_state(arch, width, seed)
    torch.save({"config": {"arch": arch, "width": width, "input": "rgb"},
                "model": {f"slow.{k}": v for k, v in state.items()}}, path)
    return state


def test_export_round_trips_through_both_layouts(tmp_path, capsys):
    state = vthcl_checkpoint(tmp_path / "last.pt", "r50", 8)
    assert export_main(["--to", "pyslowfast", str(tmp_path / "last.pt"), str(tmp_path / "psf.pyth")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "psf.pyth")
    written = torch.load(tmp_path / "psf.pyth", weights_only=True)
    assert list(written) == ["model_state"] and "s1.pathway0_stem.conv.weight" in written["model_state"]
    export(tmp_path / "last.pt", tmp_path / "ptv.pt", "pytorchvideo")
    assert "blocks.0.conv.weight" in torch.load(tmp_path / "ptv.pt", weights_only=True)
    for init in (f"pyslowfast:{tmp_path / 'psf.pyth'}", f"pytorchvideo:{tmp_path / 'ptv.pt'}"):
        encoder, cfg = load_encoder(init, arch="r50")  # vthcl.eval's entry point
        assert (cfg["arch"], cfg["width"]) == ("r50", 8) and not encoder.training
        assert all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items()), init


def test_export_refuses_r18(tmp_path, capsys):
    vthcl_checkpoint(tmp_path / "last.pt", "r18", 8)
    for to in ("pyslowfast", "pytorchvideo"):
        with pytest.raises(ValueError, match="r18 encoder has no counterpart in " + to):
            export(tmp_path / "last.pt", tmp_path / "out.pt", to)
        assert export_main(["--to", to, str(tmp_path / "last.pt"), str(tmp_path / "out.pt")]) == 2
        assert "vthcl.export: error: " in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(ValueError, match="r18"):
        weights.to_pyslowfast(Pathway("r18", 8).state_dict())


def test_load_encoder_init_strings(tmp_path):
    state = vthcl_checkpoint(tmp_path / "last.pt", "r18", 8, seed=9)
    for init in (f"vthcl:{tmp_path / 'last.pt'}", str(tmp_path / "last.pt")):
        encoder, cfg = load_encoder(init)
        assert cfg["arch"] == "r18" and all(torch.equal(v, state[k]) for k, v in encoder.state_dict().items())
    old_call, _ = load_encoder(str(tmp_path / "last.pt"), False, None, None, 0, False)
    assert torch.equal(old_call.stem[0].weight, state["stem.0.weight"])

    a, cfg = weights.load_encoder_init("random", arch="r18", width=8, seed=3)
    b, _ = load_encoder("random", arch="r18", width=8, seed=3)
    assert cfg["width"] == 8 and torch.equal(a.stem[0].weight, b.stem[0].weight)

    ptv = {"state_dict": {**weights.to_pytorchvideo(our_state("r50", 8, seed=10)),
                          "blocks.5.proj.weight": torch.zeros(3, 256)}}
    torch.save(ptv, tmp_path / "ptv.pt")
    encoder, cfg = weights.load_encoder_init(f"pytorchvideo:{tmp_path / 'ptv.pt'}")
    assert (cfg["arch"], cfg["width"]) == ("r50", 8)
    with pytest.raises(ValueError, match=r"pyslowfast:.*no counterpart of our r18"):
        weights.load_encoder_init(f"pyslowfast:{tmp_path / 'ptv.pt'}", arch="r18")

    torch.save({"model": torchvision_resnet_state("r18", seed=11)}, tmp_path / "in1k.pth")
    encoder, cfg = weights.load_encoder_init(f"imagenet2d:{tmp_path / 'in1k.pth'}")
    assert (cfg["arch"], cfg["width"]) == ("r18", 64) and encoder.res4[0].a.weight.shape[2] == 3
    with pytest.raises(ValueError, match="in1k.pth: a basic-block"):
        weights.load_encoder_init(f"imagenet2d:{tmp_path / 'in1k.pth'}", arch="r50")

    torch.save({"epoch": 3, "cfg": "x"}, tmp_path / "bad.pyth")
    with pytest.raises(ValueError, match=r"bad.pyth: not a PySlowFast Slow R50 checkpoint.*'model_state'"):
        weights.load_encoder_init(f"pyslowfast:{tmp_path / 'bad.pyth'}")
    with pytest.raises(ValueError, match="unknown init"):
        weights.load_encoder_init("torchhub:slow_r50")
