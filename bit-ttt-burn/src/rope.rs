//! Rotary position embedding (RoPE), computed on the fly for any range of positions.
//!
//! Pairs of adjacent features `(x[2i], x[2i+1])` are rotated by the angle `p · theta^(-2i/d)` for
//! position `p` (the RoFormer convention). Nothing is precomputed, so there is no maximum
//! sequence length and no state to save with a model.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Rotates the features of `x` by their positions `start..start + seq`.
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]` (`head_dim` even)
/// - returns: the same shape
///
/// # Panics
/// If `head_dim` is odd (a programmer error).
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, start: usize, theta: f64) -> Tensor<B, 4> {
    let [batch, heads, seq, head_dim] = x.dims();
    assert!(
        head_dim.is_multiple_of(2),
        "RoPE needs an even head_dim, got x of shape {:?}",
        x.dims()
    );
    let half = head_dim / 2;
    let (cos, sin) = rope_tables::<B>(start, seq, half, theta, &x.device()); // [seq, half] each
    let cos = cos.reshape([1, 1, seq, half, 1]);
    let sin = sin.reshape([1, 1, seq, half, 1]);
    let pairs = x.reshape([batch, heads, seq, half, 2]); // [batch, heads, seq, half, 2]
    let even = pairs.clone().narrow(4, 0, 1); // [batch, heads, seq, half, 1]
    let odd = pairs.narrow(4, 1, 1);
    let rotated_even = even
        .clone()
        .mul(cos.clone())
        .sub(odd.clone().mul(sin.clone()));
    let rotated_odd = even.mul(sin).add(odd.mul(cos));
    Tensor::cat(vec![rotated_even, rotated_odd], 4).reshape([batch, heads, seq, head_dim])
}

/// `cos` and `sin` of the rotation angles, each `[seq, half]`.
fn rope_tables<B: Backend>(
    start: usize,
    seq: usize,
    half: usize,
    theta: f64,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    // [seq, half]: the fused decoder's angles, row by row, so both paths rotate alike.
    let (mut cos, mut sin) = (vec![0.0; seq * half], vec![0.0; seq * half]);
    for ((p, cos), sin) in (start..start + seq)
        .zip(cos.chunks_exact_mut(half.max(1)))
        .zip(sin.chunks_exact_mut(half.max(1)))
    {
        bit_ttt_kernels::cpu::rope_angles(p, theta, cos, sin);
    }
    (
        Tensor::from_data(TensorData::new(cos, [seq, half]), device),
        Tensor::from_data(TensorData::new(sin, [seq, half]), device),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn rotates_pairs_by_hand() {
        let device = Default::default();
        // head_dim 4: pair 0 turns by p, pair 1 by p / 100 (theta = 10^4, exponent -2/4).
        let x =
            Tensor::<B, 4>::from_floats([[[[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]]]], &device);
        let y = apply_rope(x, 3, 10_000.0)
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        let (a, b) = (3.0f32, 4.0f32 / 100.0); // positions 3 and 4
        let expected = [
            a.cos(),
            a.sin(),
            (a / 100.0).cos(),
            (a / 100.0).sin(),
            4.0f32.cos(),
            4.0f32.sin(),
            -b.sin(),
            b.cos(),
        ];
        for (g, e) in y.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "{y:?} vs {expected:?}");
        }
    }

    #[test]
    fn dot_products_depend_only_on_relative_position() {
        let device = Default::default();
        let q = Tensor::<B, 4>::from_floats([[[[0.3, -1.2, 0.7, 0.5]]]], &device);
        let k = Tensor::<B, 4>::from_floats([[[[1.1, 0.4, -0.2, 0.9]]]], &device);
        let dot = |pq: usize, pk: usize| {
            let q = apply_rope(q.clone(), pq, 10_000.0);
            let k = apply_rope(k.clone(), pk, 10_000.0);
            q.mul(k).sum().into_scalar()
        };
        assert!((dot(5, 2) - dot(103, 100)).abs() < 1e-5);
    }
}
