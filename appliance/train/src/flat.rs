//! A candle model's variables as the federation's [`FlatWeights`], and back.
//!
//! The federation crate knows nothing of candle: it moves and averages flat `f32` vectors with a
//! [`Layout`]. This module is the one place where a [`VarMap`] becomes such a vector (every
//! variable sorted by name, so two appliances built from the same configuration agree byte for
//! byte) and where a vector is written back into a model.

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use cosilo_federation::weights::{FlatWeights, Layout, WeightsError};

/// A failed conversion between a candle model and flat weights.
#[derive(Debug, thiserror::Error)]
pub enum FlatError {
    /// Reading or writing a variable of the candle model failed.
    #[error("model variable {name}: {source}")]
    Candle {
        /// The variable's name.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },
    /// The var map's lock was poisoned by a panic elsewhere.
    #[error("the model's var map lock is poisoned")]
    Poisoned,
    /// The weights do not fit the model (layout or length).
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Flattens every variable of `vars` (sorted by name; deterministic).
pub fn flatten(vars: &VarMap) -> Result<FlatWeights, FlatError> {
    let map = vars.data().lock().map_err(|_| FlatError::Poisoned)?;
    let mut names: Vec<&String> = map.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    // Sized once: growing by doubling would hold up to twice the model while it copies.
    let mut data = Vec::with_capacity(names.iter().map(|n| map[*n].elem_count()).sum());
    for name in names {
        let var = &map[name];
        let candle = |source| FlatError::Candle {
            name: name.clone(),
            source,
        };
        let values = var
            .as_tensor()
            .flatten_all()
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(candle)?;
        data.extend_from_slice(&values);
        tensors.push((name.clone(), var.dims().to_vec()));
    }
    Ok(FlatWeights {
        layout: Layout { tensors },
        data,
    })
}

/// Borrowed layout and values, so [`apply`] and [`apply_values`] share one body.
struct FlatWeightsRef<'a> {
    layout: &'a Layout,
    data: &'a [f32],
}

/// The names and shapes of `vars`' variables, sorted by name (no values copied).
pub fn layout(vars: &VarMap) -> Result<Layout, FlatError> {
    let map = vars.data().lock().map_err(|_| FlatError::Poisoned)?;
    let mut tensors: Vec<(String, Vec<usize>)> = map
        .iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect();
    tensors.sort();
    Ok(Layout { tensors })
}

/// Sets every variable of `vars` in place from `weights`. Fails, changing nothing, unless `vars`
/// has exactly the weights' layout (same names, same shapes).
pub fn apply(weights: &FlatWeights, vars: &VarMap) -> Result<(), FlatError> {
    apply_values(&weights.layout, &weights.data, vars)
}

/// [`apply`] for values laid out as `layout` says, without a [`FlatWeights`] to own them.
pub fn apply_values(layout: &Layout, data: &[f32], vars: &VarMap) -> Result<(), FlatError> {
    let expected = layout.numel();
    if data.len() != expected {
        return Err(WeightsError::DataLength {
            expected,
            actual: data.len(),
        }
        .into());
    }
    let weights = FlatWeightsRef { layout, data };
    let map = vars.data().lock().map_err(|_| FlatError::Poisoned)?;
    if map.len() != weights.layout.tensors.len() {
        return Err(WeightsError::LayoutMismatch(format!(
            "model has {} variables, weights have {}",
            map.len(),
            weights.layout.tensors.len()
        ))
        .into());
    }
    // Check everything before touching anything.
    for (name, shape) in &weights.layout.tensors {
        let var = map
            .get(name)
            .ok_or_else(|| WeightsError::LayoutMismatch(format!("model has no variable {name}")))?;
        if var.dims() != shape.as_slice() {
            return Err(WeightsError::LayoutMismatch(format!(
                "{name}: model shape {:?}, weights shape {shape:?}",
                var.dims()
            ))
            .into());
        }
    }
    let mut offset = 0;
    for (name, shape) in &weights.layout.tensors {
        let var = &map[name];
        let n: usize = shape.iter().product();
        let candle = |source| FlatError::Candle {
            name: name.clone(),
            source,
        };
        let t = Tensor::from_slice(
            &weights.data[offset..offset + n],
            shape.as_slice(),
            var.device(),
        )
        .and_then(|t| t.to_dtype(var.dtype()))
        .map_err(candle)?;
        var.set(&t).map_err(candle)?;
        offset += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Init;
    use cosilo_rng::Rng;

    #[test]
    fn varmap_round_trip_and_layout_checks() {
        let build = |shape_b: usize| {
            let vm = VarMap::new();
            let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
            vb.get_with_hints((4, 3), "conv.weight", Init::Const(0.0))
                .unwrap();
            vb.get_with_hints(shape_b, "conv.bias", Init::Const(0.0))
                .unwrap();
            vb.get_with_hints(2, "bn.running_var", Init::Const(1.0))
                .unwrap();
            vm
        };
        let vm = build(4);
        let mut w = flatten(&vm).unwrap();
        let names: Vec<&str> = w.layout.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bn.running_var", "conv.bias", "conv.weight"]);
        assert_eq!(w.data.len(), 18);
        assert_eq!(&w.data[..2], &[1.0, 1.0]);
        let mut rng = Rng::new(5);
        w.data = (0..18).map(|_| rng.normal() as f32).collect();
        apply(&w, &vm).unwrap();
        let again = flatten(&vm).unwrap();
        assert_eq!(again, w);

        // A model with a different shape is refused, and left untouched.
        let other = build(5);
        let before = flatten(&other).unwrap();
        let e = apply(&w, &other).unwrap_err();
        assert!(
            matches!(e, FlatError::Weights(WeightsError::LayoutMismatch(_))),
            "{e}"
        );
        assert_eq!(flatten(&other).unwrap(), before);
        assert_ne!(before.layout.digest(), w.layout.digest());

        // Data of the wrong length is refused.
        let mut short = w.clone();
        short.data.pop();
        assert!(matches!(
            apply(&short, &vm),
            Err(FlatError::Weights(WeightsError::DataLength { .. }))
        ));
    }
}
