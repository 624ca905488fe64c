//! The KV cache: per-layer keys and values that a press can reshape.

use std::sync::Arc;

use burn::tensor::{backend::Backend, DType, Int, Tensor, TensorData};

use crate::kvquant::{KvQuant, QuantKv};
use crate::CoreError;

/// Keys, values and original token positions of one layer.
///
/// - `keys`, `values`: `[batch, kv_heads, len, head_dim]`; keys are stored after RoPE (rotated at
///   their original positions), so they stay valid wherever they are moved in the cache. In a
///   quantized layer (`quant` set) they hold only the newest slots (the residual window, in
///   full precision) and `quant` the slots before them as codes.
/// - `positions`: original position of every slot, row-major `[batch, kv_heads, len]`. After
///   per-head selection (KVCompose keeps different tokens in each head) the positions of a slot
///   differ between heads.
#[derive(Clone, Debug)]
pub struct LayerKv<B: Backend> {
    /// Keys after RoPE, `[batch, kv_heads, len, head_dim]`.
    pub keys: Tensor<B, 4>,
    /// Values, `[batch, kv_heads, len, head_dim]`.
    pub values: Tensor<B, 4>,
    /// Original positions, row-major `[batch, kv_heads, len]`.
    pub positions: Vec<u32>,
    /// Which slots hold a real token, row-major `[batch, kv_heads, len]`; `None` = all. Set when
    /// heads of a layer keep different numbers of tokens (per-head budgets): every head is padded
    /// to the layer's largest count and the padding is masked out of attention.
    pub valid: Option<Vec<bool>>,
    /// The layer's first slots as int8 / int4 codes or f16 / bf16 copies ([`crate::kvquant`], set by
    /// [`KvCache::quantize`]); `keys` and `values` then hold the slots after them. Shared between
    /// clones of the cache until one of them quantizes more tokens. `positions` and `valid` cover
    /// all slots, quantized first.
    pub quant: Option<Arc<QuantKv>>,
}

impl<B: Backend> LayerKv<B> {
    /// A full-precision layer.
    pub fn new(keys: Tensor<B, 4>, values: Tensor<B, 4>, positions: Vec<u32>, valid: Option<Vec<bool>>) -> Self {
        Self { keys, values, positions, valid, quant: None }
    }

    /// Number of cached tokens (slots per head), quantized ones included.
    pub fn len(&self) -> usize {
        self.keys.dims()[2] + self.quant.as_ref().map_or(0, |q| q.len())
    }

    /// Keys and values of every slot in full precision, `[batch, kv_heads, len, head_dim]`: the
    /// tensors themselves for a float layer; for a quantized one the codes widened (in `keys`'
    /// dtype) and the residual window after them (a copy: what attention kernels without a
    /// quantized path, observers and saved-cache readers use).
    pub fn full(&self) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.quant {
            Some(q) => crate::kvquant::with_codes(q, self.keys.clone(), self.values.clone()),
            None => (self.keys.clone(), self.values.clone()),
        }
    }

    /// Moves the oldest full-precision slots to the codes as [`KvQuant::flush_count`] says
    /// (nothing for a float layer); the residual window left is a fresh tensor (not a view
    /// holding the old buffer).
    fn flush(&mut self) {
        let Some(q) = self.quant.as_ref() else { return };
        let [b, h, r, d] = self.keys.dims();
        let n = q.spec().flush_count(r);
        if n == 0 {
            return;
        }
        self.push_oldest(n);
        let device = self.keys.device();
        let rest = |t: &Tensor<B, 4>| {
            let dtype = t.dtype();
            Tensor::<B, 4>::from_data(TensorData::new(host_slots(t, n, r - n), [b, h, r - n, d]), (&device, DType::F32)).cast(dtype)
        };
        (self.keys, self.values) = (rest(&self.keys), rest(&self.values));
    }

    /// Quantizes the oldest `n` full-precision slots into the codes (a quantized layer; `keys` and
    /// `values` are left as they are: the caller drops those slots).
    fn push_oldest(&mut self, n: usize) {
        let Some(q) = self.quant.as_mut() else { return };
        Arc::make_mut(q).push(&host_slots(&self.keys, 0, n), &host_slots(&self.values, 0, n), n);
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Additive attention bias over the layer's slots, `[batch, kv_heads, 1, 1, len]`: 0 for a
    /// real token, -inf for padding. `None` when every slot is real.
    pub fn key_bias(&self) -> Option<Tensor<B, 5>> {
        let valid = self.valid.as_ref()?;
        let [b, h, _, _] = self.keys.dims();
        let len = self.len();
        let bias: Vec<f32> = valid.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
        Some(Tensor::from_data(TensorData::new(bias, [b, h, 1, 1, len]), (&self.keys.device(), self.keys.dtype())))
    }

    /// Real (unpadded) tokens per `[batch][head]`.
    pub fn tokens_per_head(&self) -> Vec<Vec<usize>> {
        let [b, h, _, _] = self.keys.dims();
        let len = self.len();
        (0..b)
            .map(|bi| {
                (0..h)
                    .map(|hi| match &self.valid {
                        None => len,
                        Some(v) => v[(bi * h + hi) * len..(bi * h + hi + 1) * len].iter().filter(|&&x| x).count(),
                    })
                    .collect()
            })
            .collect()
    }

    /// The original positions of the real (unpadded) tokens of every `(batch, head)` row, in
    /// ascending order: `[batch * kv_heads][kept]` (the kept set of each head after compression).
    pub fn kept_positions(&self) -> Vec<Vec<u32>> {
        let len = self.len();
        if len == 0 {
            return vec![Vec::new(); self.keys.dims()[0] * self.keys.dims()[1]];
        }
        self.positions
            .chunks(len)
            .enumerate()
            .map(|(row, pos)| {
                let mut kept: Vec<u32> =
                    pos.iter().enumerate().filter(|(j, _)| self.valid.as_ref().is_none_or(|v| v[row * len + j])).map(|(_, &p)| p).collect();
                kept.sort_unstable();
                kept
            })
            .collect()
    }

    /// Bytes held by keys and values: element count x element size of the tensors' dtype, plus
    /// codes, scales and mins of a quantized layer.
    pub fn bytes(&self) -> usize {
        let elems = self.keys.shape().num_elements() + self.values.shape().num_elements();
        elems * self.keys.dtype().size() + self.quant.as_ref().map_or(0, |q| q.bytes())
    }
}

/// Slots `from..from + len` of `[batch, heads, slots, head_dim]` as host f32, row-major.
fn host_slots<B: Backend>(t: &Tensor<B, 4>, from: usize, len: usize) -> Vec<f32> {
    t.clone().narrow(2, from, len).into_data().convert::<f32>().into_vec::<f32>().expect("f32 data")
}

/// A decoder's KV cache: one [`LayerKv`] per layer, and the position the next token will take.
///
/// Layers may hold different numbers of tokens (after compression); `next_position` is the
/// original position of the next token fed to the model, so decoding after compression continues
/// at the original position even though the cache is shorter.
///
/// Appends write into a per-layer buffer with spare capacity (as llama-burn's preallocated cache),
/// so a decode step copies one token's keys and values, not the whole layer; a layer's `keys` and
/// `values` are views of the buffer's first `len` slots. [`KvCache::reserve`] sizes the buffers
/// for a known number of tokens; without it a full buffer grows by a quarter.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKv<B>>>,
    next_position: usize,
    /// Per layer: the buffer the layer's keys/values are views of, when appends may write into it.
    buffers: Vec<Option<Buffer<B>>>,
    /// Per layer: slots the next buffer should hold (from [`KvCache::reserve`]).
    targets: Vec<usize>,
}

/// Writes `[b, h, c, d]` new slots into a `[b, h, capacity, d]` buffer at slot `start` and returns
/// the buffer ([`crate::kernels::write_slots`] and [`crate::KvcBackend::kvc_write_slots`]).
pub type SlotWriter<B> = fn(Tensor<B, 4>, usize, Tensor<B, 4>) -> Tensor<B, 4>;

/// Preallocated keys/values of one layer, `[batch, kv_heads, capacity, head_dim]`; the first
/// `len` slots are the layer's content.
#[derive(Clone, Debug)]
struct Buffer<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a decoder of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            next_position: 0,
            buffers: (0..num_layers).map(|_| None).collect(),
            targets: vec![0; num_layers],
        }
    }

    /// Expects `additional` more tokens in every layer: the next buffer a layer allocates holds
    /// them all, so they are appended without reallocating (a prefill reserves its prompt, a
    /// decode its new tokens). A hint only: appending more still works. Never lowers an earlier
    /// reservation; replacing or gathering a layer (compression) clears its reservation.
    pub fn reserve(&mut self, additional: usize) {
        let lens = self.lens();
        for (t, len) in self.targets.iter_mut().zip(lens) {
            *t = (*t).max(len + additional);
        }
    }

    /// Writes `keys`/`values` (`[b, h, c, d]`) after the `old_len` slots of a layer whose current
    /// content is `old` (`None` for an empty layer); returns views of the first `old_len + c` slots.
    fn write(
        &mut self,
        layer: usize,
        old: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
        old_len: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        writer: SlotWriter<B>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, h, c, d] = keys.dims();
        let total = old_len + c;
        let reusable = |buf: &Buffer<B>| {
            let [bb, bh, cap, bd] = buf.keys.dims();
            buf.len == old_len && (bb, bh, bd) == (b, h, d) && cap >= total
        };
        let (kb, vb) = match self.buffers[layer].take().filter(reusable) {
            Some(buf) => {
                // the layer's views of the buffer go first, so the buffer is not shared and the
                // write below happens in place (burn's tensors copy on write when shared)
                drop(old);
                (buf.keys, buf.values)
            }
            None => {
                let target = self.targets[layer];
                let cap = if target >= total { target } else { total + total / 4 + 16 };
                let device = keys.device();
                let mut kb = Tensor::<B, 4>::empty([b, h, cap, d], (&device, keys.dtype()));
                let mut vb = Tensor::<B, 4>::empty([b, h, cap, d], (&device, values.dtype()));
                if let Some((ok, ov)) = old {
                    if old_len > 0 {
                        // the new buffer is not shared: the backend's writer copies in place
                        kb = writer(kb, 0, ok);
                        vb = writer(vb, 0, ov);
                    }
                }
                (kb, vb)
            }
        };
        let kb = writer(kb, old_len, keys);
        let vb = writer(vb, old_len, values);
        let views = (kb.clone().narrow(2, 0, total), vb.clone().narrow(2, 0, total));
        self.buffers[layer] = Some(Buffer { keys: kb, values: vb, len: total });
        views
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Original position of the next token to be fed (= number of tokens seen so far).
    pub fn next_position(&self) -> usize {
        self.next_position
    }

    /// Moves the next position forward by `tokens`; called by the decoder after a forward pass.
    pub fn advance(&mut self, tokens: usize) {
        self.next_position += tokens;
    }

    /// Sets the next position (e.g. to drop tokens appended for scoring). Does not touch layers.
    pub fn set_next_position(&mut self, position: usize) {
        self.next_position = position;
    }

    /// The layer's keys/values, if filled.
    ///
    /// # Errors
    /// [`CoreError::LayerOutOfRange`].
    pub fn layer(&self, layer: usize) -> Result<Option<&LayerKv<B>>, CoreError> {
        self.check_layer(layer)?;
        Ok(self.layers[layer].as_ref())
    }

    /// Cached tokens per layer (0 for an empty layer).
    pub fn lens(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.as_ref().map_or(0, LayerKv::len)).collect()
    }

    /// Bytes of keys and values over all layers.
    pub fn bytes(&self) -> usize {
        self.layer_bytes().iter().sum()
    }

    /// Bytes of keys and values per layer.
    pub fn layer_bytes(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.as_ref().map_or(0, LayerKv::bytes)).collect()
    }

    /// Appends a chunk of `chunk` new tokens (at positions `first_position..first_position+chunk`)
    /// to a layer and returns the layer's full keys and values (old then new).
    ///
    /// `keys`, `values`: `[batch, kv_heads, chunk, head_dim]`, keys after RoPE.
    ///
    /// # Errors
    /// [`CoreError::LayerOutOfRange`], [`CoreError::Shape`] when batch, heads or head_dim differ
    /// from what the layer holds.
    pub fn append(
        &mut self,
        layer: usize,
        first_position: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>), CoreError> {
        self.append_with(layer, first_position, keys, values, crate::kernels::write_slots)
    }

    /// As [`append`](Self::append), with the function that writes the new slots into the layer's
    /// buffer (a decoder passes its backend's [`crate::KvcBackend::kvc_write_slots`], which writes
    /// in place where the backend can).
    ///
    /// # Errors
    /// As [`append`](Self::append).
    pub fn append_with(
        &mut self,
        layer: usize,
        first_position: usize,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
        writer: SlotWriter<B>,
    ) -> Result<(Tensor<B, 4>, Tensor<B, 4>), CoreError> {
        self.check_layer(layer)?;
        let [b, h, c, d] = keys.dims();
        if values.dims() != [b, h, c, d] {
            return Err(CoreError::Shape(format!(
                "keys {:?} and values {:?} differ",
                keys.dims(),
                values.dims()
            )));
        }
        let new_positions = (first_position as u32..(first_position + c) as u32).collect::<Vec<_>>();
        let entry = match self.layers[layer].take() {
            None => {
                let positions = (0..b * h).flat_map(|_| new_positions.iter().copied()).collect();
                let (keys, values) = self.write(layer, None, 0, keys, values, writer);
                LayerKv::new(keys, values, positions, None)
            }
            Some(old) => {
                let [ob, oh, _, od] = old.keys.dims();
                let ol = old.len();
                if (ob, oh, od) != (b, h, d) {
                    let msg = format!("layer {layer} holds {:?}, appended {:?}", old.keys.dims(), [b, h, c, d]);
                    self.layers[layer] = Some(old);
                    return Err(CoreError::Shape(msg));
                }
                let mut positions = Vec::with_capacity(b * h * (ol + c));
                for row in 0..b * h {
                    positions.extend_from_slice(&old.positions[row * ol..(row + 1) * ol]);
                    positions.extend_from_slice(&new_positions);
                }
                let valid = old.valid.map(|v| {
                    (0..b * h).flat_map(|row| v[row * ol..(row + 1) * ol].iter().copied().chain(std::iter::repeat_n(true, c))).collect()
                });
                if let Some(q) = old.quant.as_ref() {
                    let window = old.keys.dims()[2];
                    let flushed = q.spec().flush_count(window + c);
                    let mut entry = LayerKv { keys: old.keys, values: old.values, positions, valid, quant: old.quant };
                    if flushed > 0 && flushed == window {
                        // exactly the old window goes to the codes and the appended slots are the
                        // new window, as they came (a decode step on an int8 cache: the previous
                        // token to codes; int4: a full residual window when the next tokens come):
                        // no concatenation, and the new window does not go through host memory
                        entry.push_oldest(flushed);
                        (entry.keys, entry.values) = (keys, values);
                    } else {
                        // the residual window is short: a concatenation, then its oldest slots to codes
                        entry.keys = Tensor::cat(vec![entry.keys, keys], 2);
                        entry.values = Tensor::cat(vec![entry.values, values], 2);
                        entry.flush();
                    }
                    entry
                } else {
                    let (keys, values) = self.write(layer, Some((old.keys, old.values)), ol, keys, values, writer);
                    LayerKv { keys, values, positions, valid, quant: None }
                }
            }
        };
        let out = (entry.keys.clone(), entry.values.clone());
        self.layers[layer] = Some(entry);
        Ok(out)
    }

    /// Replaces a layer's content (a press's output).
    ///
    /// # Errors
    /// [`CoreError::LayerOutOfRange`]; [`CoreError::Shape`] when keys and values differ in shape or
    /// `positions` is not `batch * kv_heads * len` long.
    pub fn replace_layer(&mut self, layer: usize, kv: LayerKv<B>) -> Result<(), CoreError> {
        self.check_layer(layer)?;
        let [b, h, _, d] = kv.keys.dims();
        let l = kv.len();
        if kv.keys.dims() != kv.values.dims()
            || kv.quant.as_ref().is_some_and(|q| (q.rows(), q.head_dim()) != (b * h, d))
            || kv.positions.len() != b * h * l
            || kv.valid.as_ref().is_some_and(|v| v.len() != b * h * l)
        {
            return Err(CoreError::Shape(format!(
                "keys {:?}, values {:?}, {} positions",
                kv.keys.dims(),
                kv.values.dims(),
                kv.positions.len()
            )));
        }
        self.layers[layer] = Some(kv);
        self.buffers[layer] = None;
        self.targets[layer] = 0;
        Ok(())
    }

    /// Keeps, in every head of a layer, the slots named by `indices` (`[batch][kv_heads][k]`, slot
    /// indices into the current layer, in the order they should be kept). Keys, values, positions
    /// and validity are gathered together.
    ///
    /// Heads may keep different numbers of slots (per-head budgets): every head is then padded to
    /// the largest count (repeating its last kept slot, or slot 0 for a head that keeps nothing)
    /// and the padding is marked invalid, so attention ignores it. The layer keeps at least one
    /// slot per head.
    ///
    /// # Errors
    /// [`CoreError::EmptyLayer`], [`CoreError::Shape`] when `indices` does not match the layer's
    /// batch and heads or holds an index `>= len`.
    pub fn gather_layer(&mut self, layer: usize, indices: &[Vec<Vec<u32>>]) -> Result<(), CoreError> {
        self.check_layer(layer)?;
        let kv = self.layers[layer].as_ref().ok_or(CoreError::EmptyLayer(layer))?;
        if kv.quant.is_some() {
            return Err(CoreError::Unsupported(format!("layer {layer} is quantized: presses run on the full-precision cache, before quantization")));
        }
        let [b, h, len, d] = kv.keys.dims();
        if indices.len() != b || indices.iter().any(|x| x.len() != h) {
            return Err(CoreError::Shape(format!("indices do not form [{b}, {h}, k]")));
        }
        if indices.iter().flatten().flatten().any(|&i| i as usize >= len) {
            return Err(CoreError::Shape(format!("index out of range for layer length {len}")));
        }
        let k = indices.iter().flatten().map(Vec::len).max().unwrap_or(0).max(1);
        let ragged = indices.iter().flatten().any(|r| r.len() != k);
        let mut flat = Vec::with_capacity(b * h * k);
        let mut positions = Vec::with_capacity(b * h * k);
        let mut valid = Vec::with_capacity(b * h * k);
        for (bi, heads) in indices.iter().enumerate() {
            for (hi, row) in heads.iter().enumerate() {
                let pad = row.last().copied().unwrap_or(0);
                for j in 0..k {
                    let i = row.get(j).copied().unwrap_or(pad) as usize;
                    flat.push(i as i64);
                    positions.push(kv.positions[(bi * h + hi) * len + i]);
                    let was_valid = kv.valid.as_ref().is_none_or(|v| v[(bi * h + hi) * len + i]);
                    valid.push(j < row.len() && was_valid);
                }
            }
        }
        let device = kv.keys.device();
        let idx = Tensor::<B, 3, Int>::from_data(TensorData::new(flat, [b, h, k]), &device)
            .unsqueeze_dim::<4>(3)
            .expand([b, h, k, d]);
        let keys = kv.keys.clone().gather(2, idx.clone());
        let values = kv.values.clone().gather(2, idx);
        let valid = (ragged || kv.valid.is_some()).then_some(valid).filter(|v| v.iter().any(|x| !x));
        self.layers[layer] = Some(LayerKv::new(keys, values, positions, valid));
        self.buffers[layer] = None;
        self.targets[layer] = 0;
        Ok(())
    }

    /// Keeps only the first `len` slots of every layer (drops tokens appended after them, e.g. a
    /// second copy of the context fed for scoring).
    pub fn truncate(&mut self, len: usize) {
        for (kv, buf) in self.layers.iter_mut().zip(self.buffers.iter_mut()) {
            let Some(kv) = kv.as_mut() else { continue };
            if let Some(spec) = kv.quant.as_ref().map(|q| q.spec()) {
                if kv.len() > len {
                    truncate_quantized(kv, spec, len);
                }
                continue;
            }
            let [b, h, l, _] = kv.keys.dims();
            if l > len {
                // the buffer's first `len` slots are still the layer's: later appends overwrite the rest
                match buf.as_mut() {
                    Some(b) if b.len == l => b.len = len,
                    _ => *buf = None,
                }
                kv.keys = kv.keys.clone().narrow(2, 0, len);
                kv.values = kv.values.clone().narrow(2, 0, len);
                kv.positions = kv.positions.chunks(l).take(b * h).flat_map(|r| r[..len].to_vec()).collect();
                if let Some(v) = &kv.valid {
                    kv.valid = Some(v.chunks(l).take(b * h).flat_map(|r| r[..len].to_vec()).collect());
                }
            }
        }
    }

    /// Quantizes every layer as `spec` says ([`crate::kvquant`]): all but the newest slots (the
    /// residual window) become codes and the full-precision buffers are freed. Run it after a
    /// press (presses score on full-precision keys and values); decode appends then go to the
    /// residual window and are quantized as groups fill. A layer already quantized the same way is
    /// left as it is.
    ///
    /// # Errors
    /// [`CoreError::Unsupported`] for a head size the format cannot hold or a layer quantized
    /// in another format.
    pub fn quantize(&mut self, spec: KvQuant) -> Result<(), CoreError> {
        for (layer, kv) in self.layers.iter_mut().enumerate() {
            let Some(kv) = kv.as_mut() else { continue };
            match kv.quant.as_ref().map(|q| q.spec()) {
                Some(s) if s == spec => continue,
                Some(s) => return Err(CoreError::Unsupported(format!("layer {layer} is already quantized as {}", s.name()))),
                None => {}
            }
            let [b, h, _, d] = kv.keys.dims();
            kv.quant = Some(Arc::new(QuantKv::new(spec, b * h, d)?));
            kv.flush();
            if kv.quant.as_ref().is_some_and(|q| q.is_empty()) {
                // nothing quantized yet (a short layer): copies, so the views do not keep the
                // freed buffer's whole capacity alive
                let copy = |t: &Tensor<B, 4>| Tensor::<B, 4>::from_data(t.to_data(), (&t.device(), t.dtype()));
                (kv.keys, kv.values) = (copy(&kv.keys), copy(&kv.values));
            }
            self.buffers[layer] = None;
            self.targets[layer] = 0;
        }
        Ok(())
    }

    /// The format of a quantized cache (from its first quantized layer); `None` for a float one.
    pub fn kv_quant(&self) -> Option<KvQuant> {
        self.layers.iter().flatten().find_map(|kv| kv.quant.as_ref().map(|q| q.spec()))
    }

    fn check_layer(&self, layer: usize) -> Result<(), CoreError> {
        if layer >= self.layers.len() {
            return Err(CoreError::LayerOutOfRange { layer, num_layers: self.layers.len() });
        }
        Ok(())
    }
}

/// Keeps the first `len` slots of a quantized layer: inside the residual window a narrowing;
/// below it the layer is widened, cut and quantized again (codes cannot be split mid-group).
fn truncate_quantized<B: Backend>(kv: &mut LayerKv<B>, spec: KvQuant, len: usize) {
    let [b, h, r, d] = kv.keys.dims();
    let ql = kv.len() - r;
    let l = kv.len();
    kv.positions = kv.positions.chunks(l).take(b * h).flat_map(|row| row[..len].to_vec()).collect();
    if let Some(v) = &kv.valid {
        kv.valid = Some(v.chunks(l).take(b * h).flat_map(|row| row[..len].to_vec()).collect());
    }
    if len > ql {
        kv.keys = kv.keys.clone().narrow(2, 0, len - ql);
        kv.values = kv.values.clone().narrow(2, 0, len - ql);
        return;
    }
    let (keys, values) = kv.full();
    kv.keys = keys.narrow(2, 0, len);
    kv.values = values.narrow(2, 0, len);
    // a format that held these keys before holds them again: `new` cannot fail here
    kv.quant = QuantKv::new(spec, b * h, d).ok().map(Arc::new);
    kv.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::TensorData;

    type B = NdArray<f32>;

    fn ramp(b: usize, h: usize, l: usize, d: usize, offset: f32) -> Tensor<B, 4> {
        let v: Vec<f32> = (0..b * h * l * d).map(|i| i as f32 + offset).collect();
        Tensor::from_data(TensorData::new(v, [b, h, l, d]), &Default::default())
    }

    fn host(t: Tensor<B, 4>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Appends write into preallocated buffers: whatever the reserve, clones, truncation or
    /// replacement in between, every layer reads back exactly what a concatenation would hold.
    #[test]
    fn buffered_appends_match_concatenation() {
        for reserve in [None, Some(3), Some(40)] {
            let mut cache = KvCache::<B>::new(1);
            if let Some(r) = reserve {
                cache.reserve(r);
            }
            let mut want_k: Vec<Tensor<B, 4>> = Vec::new();
            let mut pos = 0;
            for (i, c) in [4, 1, 1, 7, 1, 2, 9, 1].into_iter().enumerate() {
                let k = ramp(2, 3, c, 2, 1000.0 * i as f32);
                let (keys, values) = cache.append(0, pos, k.clone(), k.clone() * 2.0).unwrap();
                want_k.push(k);
                pos += c;
                let want = host(Tensor::cat(want_k.clone(), 2));
                assert_eq!(host(keys), want, "reserve {reserve:?}, step {i}");
                assert_eq!(host(values), want.iter().map(|x| x * 2.0).collect::<Vec<_>>());
            }
            // a clone appends independently of the original (copy on write)
            let mut other = cache.clone();
            let (a, _) = cache.append(0, pos, ramp(2, 3, 1, 2, -1.0), ramp(2, 3, 1, 2, -1.0)).unwrap();
            let (b, _) = other.append(0, pos, ramp(2, 3, 1, 2, -5.0), ramp(2, 3, 1, 2, -5.0)).unwrap();
            let base = host(Tensor::cat(want_k.clone(), 2));
            let with = |x: f32| host(Tensor::cat(vec![Tensor::cat(want_k.clone(), 2), ramp(2, 3, 1, 2, x)], 2));
            assert_eq!(host(a), with(-1.0));
            assert_eq!(host(b), with(-5.0));
            // truncation, then an append overwrites what was dropped
            cache.truncate(5);
            let (t, _) = cache.append(0, 5, ramp(2, 3, 2, 2, 77.0), ramp(2, 3, 2, 2, 77.0)).unwrap();
            let first5 = Tensor::<B, 4>::from_data(TensorData::new(base.clone(), [2, 3, base.len() / 12, 2]), &Default::default()).narrow(2, 0, 5);
            assert_eq!(host(t), host(Tensor::cat(vec![first5, ramp(2, 3, 2, 2, 77.0)], 2)));
            // a replaced layer starts over from its new content
            let fresh = ramp(2, 3, 2, 2, 500.0);
            cache.replace_layer(0, LayerKv::new(fresh.clone(), fresh.clone(), vec![0; 12], None)).unwrap();
            let (r, _) = cache.append(0, 9, ramp(2, 3, 1, 2, 9.0), ramp(2, 3, 1, 2, 9.0)).unwrap();
            assert_eq!(host(r), host(Tensor::cat(vec![fresh, ramp(2, 3, 1, 2, 9.0)], 2)));
        }
    }

    /// A quantized layer: the residual window stays within its bounds through appends, slots
    /// keep their order (the widened layer equals the float one within the codes' error, the
    /// residual exactly), clones quantize independently, truncation below the codes works, and
    /// presses are refused.
    #[test]
    fn quantized_layers_append_truncate_and_clone() {
        let (h, d, n0) = (2, 64, 300);
        let noise = |n: usize, seed: usize| {
            let v: Vec<f32> = (0..h * n * d).map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
            Tensor::<B, 4>::from_data(TensorData::new(v, [1, h, n, d]), &Default::default())
        };
        for spec in [KvQuant::int8(), KvQuant::int4(), KvQuant::f16(), KvQuant::bf16()] {
            let mut cache = KvCache::<B>::new(1);
            let mut want = vec![noise(n0, 1)];
            cache.append(0, 0, want[0].clone(), want[0].clone() * 2.0).unwrap();
            let float_bytes = cache.bytes();
            cache.quantize(spec).unwrap();
            // 16-bit storage: half the f32 bytes, the newest token in f32, keys padded to whole
            // blocks of 16 tokens
            let most = if spec.is_float() { float_bytes / 2 + 2 * h * d * 2 + (crate::kvquant::KEY_BLOCK - 1) * h * d * 2 } else { float_bytes / 2 - 1 };
            assert!(cache.bytes() <= most && cache.kv_quant() == Some(spec), "{spec:?}: {} of {float_bytes}", cache.bytes());
            let mut other = cache.clone();
            for i in 0..150 {
                let t = noise(1, 1000 + i);
                cache.append(0, n0 + i, t.clone(), t.clone() * 2.0).unwrap();
                want.push(t);
                let kv = cache.layer(0).unwrap().unwrap();
                let (q, r) = (kv.quant.as_ref().unwrap().len(), kv.keys.dims()[2]);
                assert_eq!(q + r, n0 + i + 1);
                assert!(r >= 1 && r <= spec.residual.max(1) + spec.granularity() && q % spec.granularity() == 0, "{spec:?}: {q} + {r}");
            }
            other.append(0, n0, noise(1, 7), noise(1, 7)).unwrap();
            assert_eq!(other.lens(), vec![n0 + 1]);
            let check = |cache: &KvCache<B>, len: usize, exact_residual: bool| {
                let kv = cache.layer(0).unwrap().unwrap();
                let (k, v) = kv.full();
                let want_k = host(Tensor::cat(want.clone(), 2).narrow(2, 0, len));
                let (k, v) = (host(k), host(v));
                let tol = if spec.bits == crate::KvBits::Int4 { 0.1 } else { 0.01 };
                assert!(k.iter().zip(&want_k).all(|(a, b)| (a - b).abs() <= tol), "{spec:?} keys");
                assert!(v.iter().zip(&want_k).all(|(a, b)| (a - 2.0 * b).abs() <= 2.0 * tol), "{spec:?} values");
                // the residual window: bit for bit (unless it was widened back from codes)
                let r = kv.keys.dims()[2];
                assert!(!exact_residual || k[(h - 1) * len * d + (len - r) * d..][..r * d] == want_k[(h - 1) * len * d + (len - r) * d..][..r * d], "{spec:?} len {len} r {r}: {:?} vs {:?}", &k[(h - 1) * len * d + (len - r) * d..][..4], &want_k[(h - 1) * len * d + (len - r) * d..][..4]);
                assert_eq!(kv.positions.len(), h * len);
            };
            check(&cache, n0 + 150, true);
            // the clone's own token did not reach the original, nor the original's the clone
            assert_eq!(other.layer(0).unwrap().unwrap().positions[n0], n0 as u32);
            cache.truncate(n0 + 140);
            // int8 holds one token in full precision: a cut below it widens and quantizes again
            check(&cache, n0 + 140, spec.bits == crate::KvBits::Int4);
            cache.truncate(200);
            check(&cache, 200, false);
            assert!(cache.gather_layer(0, &[vec![vec![0], vec![1]]]).is_err());
            assert!(cache.quantize(if spec == KvQuant::int8() { KvQuant::int4() } else { KvQuant::int8() }).is_err());
        }
    }

    /// Appends to a quantized layer in chunks of 1-64 tokens leave exactly the codes, window,
    /// positions and padding of one-token appends (the path that hands the old window to the codes
    /// as it lies and the path that concatenates first), on a padded per-head layout of batch 2,
    /// for int8, int4, int4 without a window, f16 and bf16.
    #[test]
    fn quantized_appends_in_chunks_equal_appends_one_by_one() {
        let (b, h, d, n0) = (2, 2, 64, 300);
        let noise = |n: usize, seed: usize| {
            let v: Vec<f32> = (0..b * h * n * d).map(|i| (((i + seed) * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
            Tensor::<B, 4>::from_data(TensorData::new(v, [b, h, n, d]), &Default::default())
        };
        for spec in [KvQuant::int8(), KvQuant::int4(), KvQuant { bits: crate::KvBits::Int4, residual: 0 }, KvQuant::f16(), KvQuant::bf16()] {
            let mut base = KvCache::<B>::new(1);
            base.append(0, 0, noise(n0, 1), noise(n0, 2)).unwrap();
            // per-head budgets: 250 and 180 slots kept (padded, masked)
            let keep = |k: u32| (0..k).map(|i| i + (n0 as u32 - k)).collect::<Vec<u32>>();
            base.gather_layer(0, &[vec![keep(250), keep(180)], vec![keep(180), keep(250)]]).unwrap();
            base.quantize(spec).unwrap();
            let (mut one, mut chunked) = (base.clone(), base.clone());
            let total = 400;
            let tokens = noise(total, 3);
            for i in 0..total {
                one.append(0, n0 + i, tokens.clone().narrow(2, i, 1), tokens.clone().narrow(2, i, 1) * 3.0).unwrap();
            }
            let (mut at, mut step) = (0, 0);
            while at < total {
                let c = [1, 3, 64, 1, 17, 40, 1, 1, 64, 9][step % 10].min(total - at);
                chunked.append(0, n0 + at, tokens.clone().narrow(2, at, c), tokens.clone().narrow(2, at, c) * 3.0).unwrap();
                (at, step) = (at + c, step + 1);
            }
            let (x, y) = (one.layer(0).unwrap().unwrap(), chunked.layer(0).unwrap().unwrap());
            assert_eq!(x.keys.dims(), y.keys.dims(), "{spec:?}: windows");
            assert_eq!(x.quant.as_ref().unwrap().len(), y.quant.as_ref().unwrap().len(), "{spec:?}: codes");
            assert_eq!((&x.positions, &x.valid), (&y.positions, &y.valid), "{spec:?}");
            let ((xk, xv), (yk, yv)) = (x.full(), y.full());
            assert_eq!((host(xk), host(xv)), (host(yk), host(yv)), "{spec:?}: keys and values");
            assert_eq!(one.bytes(), chunked.bytes());
        }
    }

    #[test]
    fn append_concatenates_and_tracks_positions() {
        let mut cache = KvCache::<B>::new(2);
        cache.append(0, 0, ramp(1, 2, 3, 4, 0.0), ramp(1, 2, 3, 4, 100.0)).unwrap();
        let (k, _) = cache.append(0, 3, ramp(1, 2, 1, 4, 1000.0), ramp(1, 2, 1, 4, 2000.0)).unwrap();
        assert_eq!(k.dims(), [1, 2, 4, 4]);
        let kv = cache.layer(0).unwrap().unwrap();
        assert_eq!(kv.positions, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_eq!(cache.lens(), vec![4, 0]);
        assert_eq!(cache.bytes(), 2 * 1 * 2 * 4 * 4 * 4);
        assert!(cache.layer(2).is_err());
        assert!(cache.append(0, 4, ramp(1, 3, 1, 4, 0.0), ramp(1, 3, 1, 4, 0.0)).is_err());
        // a failed append leaves the layer as it was
        assert_eq!(cache.lens(), vec![4, 0]);
    }

    #[test]
    fn gather_keeps_per_head_slots() {
        let mut cache = KvCache::<B>::new(1);
        cache.append(0, 10, ramp(1, 2, 4, 2, 0.0), ramp(1, 2, 4, 2, 0.5)).unwrap();
        cache.gather_layer(0, &[vec![vec![1, 3], vec![0, 2]]]).unwrap();
        let kv = cache.layer(0).unwrap().unwrap();
        assert_eq!(kv.positions, vec![11, 13, 10, 12]);
        let keys = kv.keys.to_data().to_vec::<f32>().unwrap();
        // head 0 slot 1 = [2,3], slot 3 = [6,7]; head 1 (offset 8) slot 0 = [8,9], slot 2 = [12,13]
        assert_eq!(keys, vec![2.0, 3.0, 6.0, 7.0, 8.0, 9.0, 12.0, 13.0]);
        // kept sets come sorted whatever the slot order
        cache.gather_layer(0, &[vec![vec![1, 0], vec![1]]]).unwrap();
        assert_eq!(cache.layer(0).unwrap().unwrap().kept_positions(), vec![vec![11, 13], vec![12]]);
        assert!(cache.gather_layer(0, &[vec![vec![5, 0], vec![0, 1]]]).is_err());
        assert!(cache.gather_layer(0, &[vec![vec![0]]]).is_err());
    }

    #[test]
    fn ragged_gather_pads_and_masks() {
        let mut cache = KvCache::<B>::new(1);
        cache.append(0, 0, ramp(1, 2, 4, 1, 0.0), ramp(1, 2, 4, 1, 0.0)).unwrap();
        cache.gather_layer(0, &[vec![vec![0, 2, 3], vec![1]]]).unwrap();
        let kv = cache.layer(0).unwrap().unwrap();
        assert_eq!(kv.len(), 3);
        assert_eq!(kv.valid.as_deref(), Some(&[true, true, true, true, false, false][..]));
        assert_eq!(kv.tokens_per_head(), vec![vec![3, 1]]);
        let bias = kv.key_bias().unwrap().into_data().to_vec::<f32>().unwrap();
        assert_eq!(bias[..4], [0.0, 0.0, 0.0, 0.0]);
        assert!(bias[4].is_infinite() && bias[5].is_infinite());
        // decode appends a real token to every head
        cache.append(0, 4, ramp(1, 2, 1, 1, 0.0), ramp(1, 2, 1, 1, 0.0)).unwrap();
        let kv = cache.layer(0).unwrap().unwrap();
        assert_eq!(kv.tokens_per_head(), vec![vec![4, 2]]);
        assert_eq!(kv.positions, vec![0, 2, 3, 4, 1, 1, 1, 4]);
        // kept sets leave the padding out
        assert_eq!(kv.kept_positions(), vec![vec![0, 2, 3, 4], vec![1, 4]]);
    }

    #[test]
    fn truncate_drops_tail() {
        let mut cache = KvCache::<B>::new(1);
        cache.append(0, 0, ramp(1, 2, 5, 2, 0.0), ramp(1, 2, 5, 2, 0.0)).unwrap();
        cache.truncate(3);
        assert_eq!(cache.lens(), vec![3]);
        assert_eq!(cache.layer(0).unwrap().unwrap().positions, vec![0, 1, 2, 0, 1, 2]);
    }
}
