"""Placement: the mesh from its config, every sharding from the Weights field metadata, and a
batch placed on a (ckpt, head) mesh equal to the host arrays it came from."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxinduct import parallel
from jaxinduct.model.weights import LEAF_AXES, ModelSpec, Weights, expected_shapes, init_random_weights
from jaxinduct.parallel import CKPT, HEAD, MeshConfig, PlacementError
from jaxinduct.scores.batched import compile_score_all
from jaxinduct.scores.probes import ProbeConfig, make_probes

SPEC = ModelSpec(d_vocab=40, d_model=16, n_layers=2, n_heads=4, d_head=8, n_ctx=40, d_mlp=32, bos_token_id=0)


def test_mesh_config_parses_the_command_line_form():
    assert MeshConfig.parse(None) == MeshConfig.parse("") == MeshConfig()
    assert MeshConfig.parse("ckpt=4,head=2") == MeshConfig(ckpt=4, head=2)
    assert MeshConfig.parse("head=2") == MeshConfig(ckpt=None, head=2)
    assert MeshConfig.parse(" ckpt = auto , head = 1 ") == MeshConfig()
    assert MeshConfig.parse(str(MeshConfig(ckpt=2, head=4))) == MeshConfig(ckpt=2, head=4)
    for bad in ("ckpt=0", "ckpt=x", "rows=2", "ckpt=2,ckpt=4", "head=auto", "ckpt"):
        with pytest.raises(PlacementError, match="ckpt=N,head=M"):
            MeshConfig.parse(bad)
    with pytest.raises(PlacementError):
        MeshConfig(ckpt=-1)


def test_the_mesh_uses_every_device_and_says_when_sizes_do_not_fit():
    devices = jax.devices()
    mesh = parallel.make_mesh(MeshConfig(head=2))
    assert dict(mesh.shape) == {CKPT: len(devices) // 2, HEAD: 2}
    assert list(mesh.devices.flat) == list(devices)  # process order kept: rows are consecutive
    with pytest.raises(PlacementError, match=f"{len(devices)} are present"):
        parallel.make_mesh(MeshConfig(ckpt=3, head=1))
    with pytest.raises(PlacementError, match="does not divide the model's 4 heads"):
        parallel.check_head_axis(SPEC, parallel.make_mesh(MeshConfig(head=8), devices[:8]))


def test_every_sharding_comes_from_the_leaf_axes():
    # Every array field of Weights declares its logical axes, as its annotation spells them.
    for field in dataclasses.fields(Weights):
        if field.name != "spec":
            assert field.name in LEAF_AXES, field.name
    mesh = parallel.make_mesh(MeshConfig(head=2))
    shardings = parallel.weight_shardings(SPEC, mesh)
    assert set(shardings) == set(expected_shapes(SPEC))
    assert shardings["W_Q"].spec == PartitionSpec(CKPT, None, HEAD, None, None)  # [ckpt, layer, head, d_model, d_head]
    assert shardings["b_V"].spec == PartitionSpec(CKPT, None, HEAD, None)
    # The wide axes go over the mesh's head axis too: vocabulary and MLP hidden units.
    assert shardings["W_E"].spec == PartitionSpec(CKPT, HEAD, None)  # [ckpt, d_vocab, d_model]
    assert shardings["W_U"].spec == PartitionSpec(CKPT, None, HEAD)
    assert shardings["b_U"].spec == PartitionSpec(CKPT, HEAD)
    assert shardings["W_in"].spec == PartitionSpec(CKPT, None, None, HEAD)  # [ckpt, layer, d_model, d_mlp]
    assert shardings["W_out"].spec == PartitionSpec(CKPT, None, HEAD, None)
    assert shardings["b_in"].spec == PartitionSpec(CKPT, None, HEAD)
    # d_model, layers and positions are replicated.
    assert shardings["b_O"].spec == PartitionSpec(CKPT, None, None)
    assert shardings["W_pos"].spec == PartitionSpec(CKPT, None, None)
    # A vocabulary the head axis does not divide (41 on 2 devices) is replicated: JAX places only even shards.
    odd = parallel.weight_shardings(dataclasses.replace(SPEC, d_vocab=41), mesh)
    assert odd["W_E"].spec == PartitionSpec(CKPT, None, None) and odd["W_in"].spec == PartitionSpec(CKPT, None, None, HEAD)
    # A new rule is one line: positions sharded over head (for the test) move W_pos.
    rules = {**parallel.AXIS_RULES, "n_ctx": HEAD}
    original = parallel.AXIS_RULES.copy()
    try:
        parallel.AXIS_RULES.clear()
        parallel.AXIS_RULES.update(rules)
        assert parallel.weight_shardings(SPEC, mesh)["W_pos"].spec == PartitionSpec(CKPT, HEAD, None)
    finally:
        parallel.AXIS_RULES.clear()
        parallel.AXIS_RULES.update(original)


def test_a_sharded_checkpoint_holds_its_share_of_the_bytes_on_each_device():
    # One checkpoint on 8 devices of the head axis: the compiled scan program's arguments per
    # device are the weights' bytes / 8 (within 10%), plus the probes and flags, counted here.
    devices = jax.devices()[:8]
    mesh = parallel.make_mesh(MeshConfig(ckpt=1, head=8), devices)
    spec = ModelSpec(d_vocab=1024, d_model=64, n_layers=2, n_heads=8, d_head=8, n_ctx=64, d_mlp=512,
                     positional="rotary", bos_token_id=0)  # fmt: skip
    shapes = expected_shapes(spec)
    shardings = parallel.weight_shardings(spec, mesh, batch=1)
    abstract = Weights(spec=spec, **{name: jax.ShapeDtypeStruct((1, *shape), np.float32, sharding=shardings[name])
                                     for name, shape in shapes.items()})  # fmt: skip
    probes = make_probes(spec, ProbeConfig(n_examples=2, block_len=6))
    # induction_loss reads every weight (a forward pass, then the unembedding): jit prunes no argument.
    program = compile_score_all(abstract, probes, mesh=mesh, scores=["induction_loss"], valid=np.ones(1, bool))
    per_device = program.compiled.memory_analysis().argument_size_in_bytes
    total = sum(4 * int(np.prod(shape)) for shape in shapes.values())
    probe_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(program.probes)) + 1  # + the one valid flag
    assert abs((per_device - probe_bytes) - total / 8) <= 0.1 * total / 8, (per_device, probe_bytes, total)
    # Replicated, the same program would hold every byte on every device.
    assert per_device - probe_bytes < total / 4


def test_a_placed_batch_holds_the_host_arrays_on_the_mesh():
    mesh = parallel.make_mesh(MeshConfig(head=2))
    batch = mesh.shape[CKPT]
    host = [init_random_weights(SPEC, seed) for seed in range(batch)]
    placed = parallel.place_batch(host, SPEC, parallel.weight_shardings(SPEC, mesh), batch)
    assert parallel.mesh_of(placed) == mesh
    assert parallel.local_rows(mesh, batch) == list(range(batch))  # one process holds every row
    for name in expected_shapes(SPEC):
        np.testing.assert_array_equal(np.asarray(getattr(placed, name)), np.stack([np.asarray(getattr(w, name)) for w in host]))
    gathered = parallel.gather_results({"W_Q": placed.W_Q})
    assert isinstance(gathered["W_Q"], np.ndarray) and gathered["W_Q"].shape == (batch, *expected_shapes(SPEC)["W_Q"])
    flags = parallel.gather_flags(np.array([True, False]), batch)
    assert flags.tolist() == [True, False] + [False] * (batch - 2)


def test_each_device_scores_its_own_checkpoints_where_that_is_possible():
    one = parallel.make_mesh(MeshConfig(ckpt=1, head=len(jax.devices())))
    assert parallel.checkpoint_parallel(None) is None
    assert parallel.checkpoint_parallel(one) is None  # one device on ckpt: one program
    cpu = parallel.make_mesh(MeshConfig(head=2))
    plan = parallel.checkpoint_parallel(cpu)
    assert plan is not None and plan.manual == {CKPT, HEAD}  # CPU: whole checkpoints per device
