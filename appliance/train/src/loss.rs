//! Segmentation loss: soft Dice over the foreground classes plus pixel-wise cross-entropy.
//!
//! Both are computed from `log_softmax` over the class axis. On the CPU the whole loss is one fused
//! op ([`super::ops::dice_cross_entropy`]); [`dice_cross_entropy_reference`] builds it from candle
//! ops (used on other devices); `gradcheck` checks both against finite differences and each other.

use candle_core::{DType, Result, Tensor};

/// The loss and its two parts (the parts are detached scalars for logging).
pub struct LossParts {
    pub total: Tensor,
    pub cross_entropy: f32,
    pub dice_loss: f32,
}

/// Smoothing term of the soft Dice (keeps classes absent from a batch from dividing by zero).
pub const DICE_SMOOTH: f64 = 1.0;

/// `ce + (1 − mean soft Dice over classes 1..C)` for logits and a one-hot target, both
/// `(b, classes, h, w)`. Dice is computed over the whole batch per class.
pub fn dice_cross_entropy(logits: &Tensor, one_hot: &Tensor) -> Result<LossParts> {
    if !(logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64)) {
        return dice_cross_entropy_reference(logits, one_hot);
    }
    let parts =
        super::ops::dice_cross_entropy(logits, &one_hot.to_dtype(logits.dtype())?, DICE_SMOOTH)?;
    let values: Vec<f32> = parts.to_dtype(DType::F32)?.to_vec1()?;
    Ok(LossParts {
        total: parts.narrow(0, 0, 1)?.squeeze(0)?,
        cross_entropy: values[1],
        dice_loss: values[2],
    })
}

/// [`dice_cross_entropy`] written with candle's tensor ops.
pub fn dice_cross_entropy_reference(logits: &Tensor, one_hot: &Tensor) -> Result<LossParts> {
    let (b, c, h, w) = logits.dims4()?;
    let log_p = candle_nn::ops::log_softmax(logits, 1)?;
    let ce = (log_p.mul(one_hot)?.sum_all()? * (-1.0 / (b * h * w) as f64))?;
    let p = log_p.exp()?;
    let inter = p.mul(one_hot)?.sum((0, 2, 3))?;
    let denom = (p.sum((0, 2, 3))? + one_hot.sum((0, 2, 3))?)?;
    let dice = ((inter * 2.0)? + DICE_SMOOTH)?.div(&(denom + DICE_SMOOTH)?)?;
    let fg = dice.narrow(0, 1, c - 1)?;
    let dice_loss = (1.0 - fg.mean_all()?)?;
    let total = (&ce + &dice_loss)?;
    Ok(LossParts {
        cross_entropy: ce.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        dice_loss: dice_loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
        total,
    })
}

/// One-hot encoding `(b, classes, h, w)` of class maps given as `b` row-major `h × w` slices.
pub fn one_hot(classes_per_pixel: &[u8], b: usize, classes: usize, h: usize, w: usize) -> Vec<f32> {
    let hw = h * w;
    let mut out = vec![0f32; b * classes * hw];
    for n in 0..b {
        for p in 0..hw {
            let c = classes_per_pixel[n * hw + p] as usize;
            if c < classes {
                out[(n * classes + c) * hw + p] = 1.0;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn perfect_prediction_has_low_loss_and_wrong_has_high() {
        let dev = Device::Cpu;
        let target: Vec<u8> = (0..2 * 4 * 4).map(|i| (i % 3) as u8).collect();
        let oh = Tensor::from_vec(one_hot(&target, 2, 3, 4, 4), (2, 3, 4, 4), &dev).unwrap();
        let good = (&oh * 20.0).unwrap();
        let bad = ((1.0 - &oh).unwrap() * 20.0).unwrap();
        let lg = dice_cross_entropy(&good, &oh).unwrap();
        let lb = dice_cross_entropy(&bad, &oh).unwrap();
        assert!(
            lg.cross_entropy < 1e-6 && lg.dice_loss < 0.05,
            "{} {}",
            lg.cross_entropy,
            lg.dice_loss
        );
        assert!(lb.cross_entropy > 15.0 && lb.dice_loss > 0.9);
        let t = lg.total.to_scalar::<f32>().unwrap();
        assert!((t - lg.cross_entropy - lg.dice_loss).abs() < 1e-6);
    }

    #[test]
    fn one_hot_layout() {
        let oh = one_hot(&[0, 2, 1, 2], 1, 3, 2, 2);
        assert_eq!(oh, vec![1., 0., 0., 0., 0., 0., 1., 0., 0., 1., 0., 1.]);
    }
}
