//! Deterministic initialisation: every element of a full tensor is a pure function of (seed,
//! tensor name, flat index), so a rank generates only its slice, and the slices at tp = 4 are
//! exactly the slices of the tensor at tp = 1.

use super::placement::Slice;
use crate::random::{key_of, normal, uniform01};
use candle_core::{Device, Result, Tensor};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::Init;

/// The value of each element, as candle-nn's `Init` describes the distribution.
enum Dist {
    Const(f64),
    Normal { mean: f64, std: f64 },
    Uniform { lo: f64, up: f64 },
}

fn dist(init: Init, full: &[usize]) -> Dist {
    match init {
        Init::Const(v) => Dist::Const(v),
        Init::Randn { mean, stdev } => Dist::Normal { mean, std: stdev },
        Init::Uniform { lo, up } => Dist::Uniform { lo, up },
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let receptive: usize = full.iter().skip(2).product();
            let fan = match fan {
                FanInOut::FanIn => full.get(1).map_or(1, |d| d * receptive),
                FanInOut::FanOut => full.first().map_or(1, |d| d * receptive),
            };
            let gain = match non_linearity {
                NonLinearity::ReLU => 2f64.sqrt(),
                NonLinearity::Tanh => 5.0 / 3.0,
                NonLinearity::Linear | NonLinearity::Sigmoid => 1.0,
                NonLinearity::SELU => 0.75,
                NonLinearity::ExplicitGain(g) => g,
            };
            let std = gain / (fan as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => Dist::Normal { mean: 0.0, std },
                NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    Dist::Uniform { lo: -b, up: b }
                }
            }
        }
    }
}

/// This rank's slice of the deterministic initialisation of `name`: only its elements are
/// generated, each from its flat index in the full tensor.
pub(crate) fn init_slice(
    seed: u64,
    name: &str,
    full: &[usize],
    slice: Option<&Slice>,
    init: Init,
) -> Result<Tensor> {
    let key = key_of(seed, name);
    let d = dist(init, full);
    let value = |i: usize| -> f32 {
        let i = i as u64;
        (match d {
            Dist::Const(v) => v,
            Dist::Normal { mean, std } => mean + std * normal(key, i),
            Dist::Uniform { lo, up } => lo + (up - lo) * uniform01(key, i),
        }) as f32
    };
    let (dims, values) = match slice {
        None => (
            full.to_vec(),
            (0..full.iter().product()).map(value).collect::<Vec<f32>>(),
        ),
        Some(s) => {
            let outer: usize = full[..s.dim].iter().product();
            let inner: usize = full[s.dim + 1..].iter().product();
            let mut v = Vec::with_capacity(outer * s.padded * inner);
            for o in 0..outer {
                let base = (o * full[s.dim] + s.start) * inner;
                v.extend((base..base + s.len * inner).map(value));
                v.extend(std::iter::repeat_n(0f32, (s.padded - s.len) * inner));
            }
            let mut dims = full.to_vec();
            dims[s.dim] = s.padded;
            (dims, v)
        }
    };
    Tensor::from_vec(values, dims, &Device::Cpu)
}
