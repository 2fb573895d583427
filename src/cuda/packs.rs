//! Foundry kernel packs in the CUDA backend: the promoted kernels of this GPU architecture,
//! compiled at start-up and launched in place of the built-in kernel of a step for the
//! token bucket they won (see `crate::kernels::pack`).
//!
//! Why only in patched plans: a pack kernel is a patch. `zmoe validate` runs the reference
//! plan (always the built-in kernels) against the patched plan on one backend, so its
//! fidelity verdict and speedup measure exactly what the pack changes — and the backend's
//! name lists the pack kernels that actually ran, which is what lets such a capsule vouch
//! for a numerics-changing entry at `zmoe foundry promote --fidelity`.
//!
//! Where: `$ZMOE_KERNEL_PACK` (`off` disables), else `<cache>/packs/<arch>.json`; absent =
//! nothing to do. Entries whose source hash no longer matches the current template, whose
//! architecture differs or that fail to compile are ignored with a warning on stderr.

use std::cell::Cell;

use super::{Arg, Device, Module};
use crate::error::Result;
use crate::kernels::knobs;
use crate::kernels::ops::{OpId, Shape};
use crate::kernels::pack::{Entry, KernelPack, default_path};
use crate::kernels::templates::{self, Template};
use crate::plan::lower::PackKernel;

struct Loaded {
    entry: Entry,
    op: OpId,
    template: &'static Template,
    module: Module,
    used: Cell<bool>,
}

/// The pack kernels of one backend.
#[derive(Default)]
pub(crate) struct PackKernels {
    loaded: Vec<Loaded>,
}

impl PackKernels {
    /// Loads and compiles the pack for `dev`'s architecture, if there is one.
    pub(crate) fn load(dev: &Device) -> PackKernels {
        let arch = dev.arch();
        if std::env::var("ZMOE_KERNEL_PACK").is_ok_and(|v| v == "off" || v == "none") {
            return PackKernels::default();
        }
        let path = default_path(&arch);
        if !path.exists() {
            if std::env::var_os("ZMOE_KERNEL_PACK").is_some() {
                eprintln!("warning: ZMOE_KERNEL_PACK={}: no such file; no kernel pack used", path.display());
            }
            return PackKernels::default();
        }
        let warn = |w: String| eprintln!("warning: {}: {w}", path.display());
        let pack = match KernelPack::load(&path) {
            Ok(p) => p,
            Err(e) => {
                warn(format!("kernel pack not used: {e}"));
                return PackKernels::default();
            }
        };
        if pack.arch != arch {
            warn(format!("kernel pack is for {}, this GPU is {arch}; not used", pack.arch));
            return PackKernels::default();
        }
        pack.warnings().into_iter().for_each(&warn);
        let mut loaded = Vec::new();
        for e in pack.entries {
            let (op, src) = match e.render() {
                Ok(x) => x,
                Err(why) => {
                    warn(format!("kernel pack: ignoring {}: {why}", e.tag()));
                    continue;
                }
            };
            let template = match templates::find(op, &e.template) {
                Ok(t) => t,
                Err(why) => {
                    warn(format!("kernel pack: ignoring {}: {why}", e.tag()));
                    continue;
                }
            };
            match dev.load_module(&src.source, &[&op.kernel_name()]) {
                Ok(module) => loaded.push(Loaded { entry: e, op, template, module, used: Cell::new(false) }),
                Err(why) => warn(format!("kernel pack: ignoring {}: {why}", e.tag())),
            }
        }
        PackKernels { loaded }
    }

    /// The kernels compiled and ready, for the plan rewrite (`plan::lower::cuda`).
    pub(crate) fn available(&self) -> Vec<PackKernel> {
        self.loaded.iter().map(|l| PackKernel { op: l.op, bucket: l.entry.bucket, tag: l.entry.tag() }).collect()
    }

    /// Launches pack kernel `k` at `shape.tokens` on `ptrs` (the op's tensors, in the order
    /// of its kernel signature); `false` if its knobs cannot run this shape (the caller
    /// launches the built-in kernel).
    pub(crate) fn launch(&self, dev: &Device, k: &PackKernel, shape: &Shape, ptrs: &[u64]) -> Result<bool> {
        let op = k.op;
        let Some(l) = self.loaded.iter().find(|l| l.op == op && l.entry.bucket == k.bucket && l.entry.tag() == k.tag)
        else {
            return Err(crate::error::Error::Cuda(format!("plan names pack kernel {}, which is not loaded", k.tag)));
        };
        if !(l.template.fits)(shape, &l.entry.knobs) || op.supports(shape).is_err() {
            return Ok(false);
        }
        let launch = (l.template.launch)(shape, &l.entry.knobs);
        let args: Vec<Arg> = op.kernel_args(shape, ptrs);
        dev.launch_in(
            &l.module,
            &op.kernel_name(),
            (launch.grid[0], launch.grid[1], launch.grid[2]),
            launch.block,
            &args,
        )?;
        l.used.set(true);
        Ok(true)
    }

    /// `foundry: moe_combine/t1_vec@…{TPB=128,…}, …` for the kernels that ran; `None` if none did.
    pub(crate) fn summary(&self) -> Option<String> {
        let used: Vec<String> = self
            .loaded
            .iter()
            .filter(|l| l.used.get())
            .map(|l| format!("{} {} {{{}}}", l.entry.tag(), l.entry.bucket.name(), knobs::display(&l.entry.knobs)))
            .collect();
        (!used.is_empty()).then(|| format!("foundry: {}", used.join(", ")))
    }
}
