//! Fast CPU operations for the U-Net, inside candle's autograd.
//!
//! candle 0.11.1's CPU convolutions run at 12-75 GFLOP/s forward and 3-5× slower backward, and
//! its element-wise ops (a full pass and a fresh tensor each) make GroupNorm cost ~10 passes each
//! way (DEPS.md; profile in `bench/results/train_profile.md`). These ops do the same maths as candle's with multi-threaded kernels, as candle
//! custom ops (`CustomOp1/2/3` with `bwd`) so that `Tensor::backward` still drives them:
//!
//! - [`conv2d`]: stride-1 convolution + bias: direct AVX2 kernels for 3×3 in f32 (`direct`),
//!   else im2col tiles × `gemm`; its input gradient is the same kernel on the flipped, transposed
//!   weights, its weight gradient a direct kernel or another `gemm` per tile.
//! - [`group_norm_relu`]: GroupNorm and ReLU in one pass each way, with a hand-written backward.
//! - [`conv_group_norm_relu`]: the two above as one graph node (the U-Net's blocks), which saves
//!   candle's backward a full-size gradient buffer per block.
//! - [`max_pool_2x2`]: 2×2 max-pool whose gradient goes to every element equal to the maximum,
//!   like the reshape + max formulation it replaces (candle's `max_pool2d` gradient is wrong).
//! - [`conv_transpose_2x2`]: the 2×2 stride-2 transposed convolution + bias as one `gemm`.
//! - [`cat_channels`]: concatenation on the channel axis whose backward returns contiguous slices.
//! - [`dice_cross_entropy`]: the training loss (softmax, cross-entropy, soft Dice) in one op.
//!
//! Every function takes the custom path only for f32/f64 tensors on the CPU; on any other device
//! (CUDA) it calls candle's own ops, so GPU builds keep working with candle's kernels. The
//! [`reference`] module holds those candle formulations; `gradcheck` tests each op against them and
//! against finite differences.
//!
//! Kernels are generic over f32 and f64 (the gradient tests run in f64) and parallelise over
//! images, or image × group, on rayon's pool (`par`); a single image hands the threads to
//! `gemm` instead. 3×3 convolutions in f32 on CPUs with AVX2 + FMA use the direct kernels of
//! `direct` (`COSILO_DIRECT_CONV=0` turns them off, for comparison).
//!
//! A training step allocates and frees ~100 tensors of up to tens of MB. glibc returns such blocks
//! to the OS on free, so every step page-faults them back in (~40k faults per step of the default
//! model, ~10% of its CPU time on a VM). The first custom op call therefore asks glibc to keep
//! freed memory for reuse ([`keep_freed_memory`]; `COSILO_MALLOC_TUNE=0` leaves glibc alone).

mod block;
mod conv;
mod conv_transpose;
mod direct;
mod gemm;
mod loss;
mod norm;
mod par;
pub mod profile;
mod shape;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType};

pub use block::conv_group_norm_relu;
pub use conv::conv2d;
pub use conv_transpose::conv_transpose_2x2;
pub use loss::dice_cross_entropy;
pub use norm::group_norm_relu;
pub use shape::{cat_channels, max_pool_2x2};

/// Element types the kernels support.
pub trait Real: WithDType + Default + Send + Sync + 'static {}
impl Real for f32 {}
impl Real for f64 {}

/// Whether `t` takes the custom CPU path (f32/f64 on the CPU).
fn custom_path(t: &Tensor) -> bool {
    let cpu = t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64);
    if cpu {
        keep_freed_memory();
    }
    cpu
}

/// Makes glibc's malloc keep freed memory in the process (blocks up to 32 MiB come from the heap,
/// which is trimmed only past 1 GiB free) instead of unmapping it, so that the next step's tensors
/// reuse pages instead of faulting fresh ones in. Once per process; a no-op off glibc.
pub fn keep_freed_memory() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        if std::env::var_os("COSILO_MALLOC_TUNE").is_some_and(|v| v == "0") {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            extern "C" {
                fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
            }
            const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
            const M_TOP_PAD: std::ffi::c_int = -2;
            const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
            // SAFETY: mallopt only changes allocator parameters; glibc serialises it with
            // allocation, and these values are within its documented ranges.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 1 << 30);
                mallopt(M_TOP_PAD, 64 << 20);
            }
        }
    });
}

/// The contiguous elements of a CPU tensor argument.
fn data<'a, T: Real>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("{op}: arguments must be contiguous"),
    }
}

/// A kernel's result as candle storage.
fn storage<T: Real>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// `zero` of the element type.
fn zero<T: Real>() -> T {
    T::from_f64(0.0)
}

/// Threads available to the kernels (rayon's pool: `RAYON_NUM_THREADS`, else the cores).
fn threads() -> usize {
    par::threads()
}

/// Runs `f(dtype-specific)` for an f32 or f64 storage, the dtype chosen from the first argument.
macro_rules! dispatch {
    ($op:expr, $first:expr, |$t:ident| $body:expr) => {
        match $first {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: unsupported dtype {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
use dispatch;

/// candle's own formulations of the ops above: the CUDA path, and the reference the tests and
/// the old-vs-new training comparison check against.
pub mod reference {
    use candle_core::{Result, Tensor};

    /// `conv2d` (stride 1) + bias, as `candle_nn::Conv2d::forward` computes it.
    pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Result<Tensor> {
        let y = x.conv2d(w, padding, 1, 1, 1)?;
        y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)
    }

    /// `candle_nn::GroupNorm::forward` followed by ReLU.
    pub fn group_norm_relu(
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        groups: usize,
        eps: f64,
    ) -> Result<Tensor> {
        let c = gamma.elem_count();
        let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, eps)?;
        candle_core::Module::forward(&gn, x)?.relu()
    }

    /// 2×2 max-pool as reshape + max (the gradient reaches every element equal to the maximum).
    pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)
    }

    /// `candle_nn::ConvTranspose2d::forward` with kernel 2, stride 2, no padding.
    pub fn conv_transpose_2x2(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose2d(w, 0, 0, 2, 1)?;
        y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)
    }

    /// `Tensor::cat` on the channel axis.
    pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Tensor::cat(&[a, b], 1)
    }
}
