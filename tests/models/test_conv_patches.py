"""Conv's patches (the left factor of its kernel's per-example gradient) equal JAX's own."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpbench.models.layers import conv_patches

CASES = [
    (image, kernel, strides, padding, dilation)
    for image, kernel, strides, padding, dilation in itertools.product(
        [(10, 9, 3), (28, 28, 1)],
        [(3, 3), (8, 8), (4, 2)],
        [(1, 1), (2, 2), (2, 1)],
        ["SAME", "VALID", ((1, 2), (0, 3))],
        [(1, 1), (2, 1)],
    )
    if (kernel[0] - 1) * dilation[0] < image[0]
]


@pytest.mark.parametrize("image,kernel,strides,padding,dilation", CASES[::5] + CASES[-1:])
def test_patches_equal_jax_patches_in_the_kernels_row_order(image, kernel, strides, padding, dilation):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *image)), jnp.float32)
    reference = jax.lax.conv_general_dilated_patches(  # features ordered (C, kh, kw)
        x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    channels, window = image[2], kernel[0] * kernel[1]
    reordered = reference.reshape(*reference.shape[:3], channels, window).swapaxes(-1, -2)
    patches = conv_patches(x, (*kernel, channels, 5), strides, padding, dilation)
    assert patches.shape == reference.shape
    np.testing.assert_array_equal(np.asarray(patches), np.asarray(reordered.reshape(reference.shape)))


def test_patches_times_output_gradient_is_the_kernel_gradient():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 9, 8, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 2, 4, 6)), jnp.float32)

    def conv(k):
        return jax.lax.conv_general_dilated(x, k, (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out, vjp = jax.vjp(conv, kernel)
    dy = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
    patches = conv_patches(x, kernel.shape, (2, 1), "SAME", (1, 1))
    from_patches = jnp.einsum("bhwk,bhwf->kf", patches, dy, precision="highest").reshape(kernel.shape)
    np.testing.assert_allclose(np.asarray(from_patches), np.asarray(vjp(dy)[0]), rtol=1e-5, atol=1e-5)
