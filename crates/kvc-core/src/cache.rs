//! The KV cache: per-layer keys and values that a press can reshape.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::CoreError;

/// Keys, values and original token positions of one layer.
///
/// - `keys`, `values`: `[batch, kv_heads, len, head_dim]`; keys are stored after RoPE (rotated at
///   their original positions), so they stay valid wherever they are moved in the cache.
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
}

impl<B: Backend> LayerKv<B> {
    /// Number of cached tokens (slots per head).
    pub fn len(&self) -> usize {
        self.keys.dims()[2]
    }

    /// True when no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Additive attention bias over the layer's slots, `[batch, kv_heads, 1, 1, len]`: 0 for a
    /// real token, -inf for padding. `None` when every slot is real.
    pub fn key_bias(&self) -> Option<Tensor<B, 5>> {
        let valid = self.valid.as_ref()?;
        let [b, h, len, _] = self.keys.dims();
        let bias: Vec<f32> = valid.iter().map(|&v| if v { 0.0 } else { f32::NEG_INFINITY }).collect();
        Some(Tensor::from_data(TensorData::new(bias, [b, h, 1, 1, len]), &self.keys.device()))
    }

    /// Real (unpadded) tokens per `[batch][head]`.
    pub fn tokens_per_head(&self) -> Vec<Vec<usize>> {
        let [b, h, len, _] = self.keys.dims();
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

    /// Bytes held by keys and values (element count x element size of the tensors' dtype).
    pub fn bytes(&self) -> usize {
        let elems = self.keys.shape().num_elements() + self.values.shape().num_elements();
        elems * self.keys.dtype().size()
    }
}

/// A decoder's KV cache: one [`LayerKv`] per layer, and the position the next token will take.
///
/// Layers may hold different numbers of tokens (after compression); `next_position` is the
/// original position of the next token fed to the model, so decoding after compression continues
/// at the original position even though the cache is shorter.
#[derive(Clone, Debug)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<LayerKv<B>>>,
    next_position: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for a decoder of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: (0..num_layers).map(|_| None).collect(), next_position: 0 }
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
                LayerKv { keys, values, positions, valid: None }
            }
            Some(old) => {
                let [ob, oh, ol, od] = old.keys.dims();
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
                LayerKv {
                    keys: Tensor::cat(vec![old.keys, keys], 2),
                    values: Tensor::cat(vec![old.values, values], 2),
                    positions,
                    valid,
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
        let [b, h, l, _] = kv.keys.dims();
        if kv.keys.dims() != kv.values.dims()
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
        self.layers[layer] = Some(LayerKv { keys, values, positions, valid });
        Ok(())
    }

    /// Keeps only the first `len` slots of every layer (drops tokens appended after them, e.g. a
    /// second copy of the context fed for scoring).
    pub fn truncate(&mut self, len: usize) {
        for kv in self.layers.iter_mut().flatten() {
            let [b, h, l, _] = kv.keys.dims();
            if l > len {
                kv.keys = kv.keys.clone().narrow(2, 0, len);
                kv.values = kv.values.clone().narrow(2, 0, len);
                kv.positions = kv.positions.chunks(l).take(b * h).flat_map(|r| r[..len].to_vec()).collect();
                if let Some(v) = &kv.valid {
                    kv.valid = Some(v.chunks(l).take(b * h).flat_map(|r| r[..len].to_vec()).collect());
                }
            }
        }
    }

    fn check_layer(&self, layer: usize) -> Result<(), CoreError> {
        if layer >= self.layers.len() {
            return Err(CoreError::LayerOutOfRange { layer, num_layers: self.layers.len() });
        }
        Ok(())
    }
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
