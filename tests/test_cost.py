"""The cost of a compiled program (jaxinduct/engine/cost.py) against counts made by hand."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxinduct.engine.cost import compiled_cost


def compile(fn, *shapes):
    return jax.jit(fn).lower(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)).compile()


def test_a_product_inside_a_loop_counts_once_per_trip():
    # 6 trips of an [8, 64] x [64, 64] product: XLA's own cost analysis counts the body once.
    def layers(weights, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, weights)[0]

    cost = compiled_cost(compile(layers, (6, 64, 64), (8, 64)))
    assert cost.flops == 6 * 2 * 8 * 64 * 64
    assert cost.unbounded_loops == 0


def test_nested_loops_multiply_and_batched_products_count_their_batch():
    def nested(a, b):
        def outer(carry, _):
            inner = jax.lax.scan(lambda c, _: (jnp.sin(jnp.einsum("bij,bjk->bik", c, b)), None), carry, None, length=3)
            return inner[0], None

        return jax.lax.scan(outer, a, None, length=4)[0]

    cost = compiled_cost(compile(nested, (5, 16, 32), (5, 32, 32)))
    assert cost.flops == 4 * 3 * 2 * 5 * 16 * 32 * 32


def test_a_product_no_output_needs_is_not_counted():
    def dead(x, w):
        _ = x @ w  # dropped by XLA, as a forward pass's unread logits are
        return x.sum()

    assert compiled_cost(compile(dead, (64, 64), (64, 64))).flops == 0


def test_a_conditional_counts_its_dearest_branch():
    def either(flag, x):
        return jax.lax.cond(flag > 0, lambda v: v @ v @ v, lambda v: v @ v, x)

    compiled = jax.jit(either).lower(jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((32, 32), jnp.float32)).compile()
    assert compiled_cost(compiled).flops == 2 * 2 * 32**3


def test_eigenproblems_are_counted_with_their_size():
    cost = compiled_cost(compile(lambda m: jnp.linalg.eigvals(m).real.sum(), (5, 8, 8)))
    assert cost.eigenproblems == 5
    assert cost.eig_flops == 5 * 10 * 8**3


def test_bytes_of_a_streaming_pass_are_what_it_reads_and_writes():
    # One fused element-wise unit: reads 4 MB and writes 4 MB.
    cost = compiled_cost(compile(lambda x: x * 2.0 + 1.0, (2**20,)))
    assert cost.bytes_accessed == 2 * 4 * 2**20


def test_counts_match_the_run():
    # The count is of what runs: a 2-trip loop of one product gives the product twice.
    def twice(x, w):
        return jax.lax.fori_loop(0, 2, lambda _, h: h @ w, x)

    cost = compiled_cost(compile(twice, (4, 16), (16, 16)))
    assert cost.flops == 2 * 2 * 4 * 16 * 16
    x, w = np.ones((4, 16), np.float32), np.eye(16, dtype=np.float32) * 2
    np.testing.assert_allclose(jax.jit(twice)(x, w), x * 4)
