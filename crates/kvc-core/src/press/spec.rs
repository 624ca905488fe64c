//! The press registry: one typed, serde-serializable [`PressSpec`] (name + budget + options with
//! kvpress's names and defaults) that the CLI (`--press`, `--ratio`/`--budget`,
//! `--press-option`), evaluation configs and apps all parse, and the documentation of every press
//! ([`docs`], printed by `kvc presses`).
//!
//! Adding a scorer press: write `press/NAME.rs` with a [`Scorer`] that also implements
//! [`Registered`] (its [`PressDoc`] with options and defaults, and `from_options`), then add one
//! line to the `scorers!` list below.

use std::collections::BTreeMap;
use std::fmt;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::scorer::{Allocation, HeadScores, PrefillNeeds, ScoreInput, Scorer, ScorerPress};
use super::{Budget, KvCompose, Press};
use crate::capture::CaptureSpec;
use crate::CoreError;

/// How a press lays out what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Every layer and head keeps the same number of tokens.
    Uniform,
    /// Layers keep different numbers; heads of a layer the same (plain layout per layer).
    PerLayer,
    /// Heads keep different numbers (padded to the layer's largest head, padding masked).
    PerHead,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Uniform => "uniform",
            Layout::PerLayer => "per-layer",
            Layout::PerHead => "per-head",
        })
    }
}

/// One option of a press: its kvpress name, default and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OptionDoc {
    /// Name, as in kvpress.
    pub name: &'static str,
    /// Default value, as text.
    pub default: &'static str,
    /// Meaning and accepted values.
    pub help: &'static str,
}

/// What `kvc presses` prints of a press.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PressDoc {
    /// Registry name (`--press NAME`).
    pub name: &'static str,
    /// What it scores / keeps.
    pub about: &'static str,
    /// kvpress file and paper the formula follows.
    pub source: &'static str,
    /// How kept tokens are laid out.
    pub layout: Layout,
    /// What it costs beyond a plain prefill.
    pub cost: &'static str,
    /// Times the press feeds the context through the model again while it compresses (KVCompose:
    /// once, into a second copy of the cache); sizes the KV memory a compression needs.
    pub refeeds: usize,
    /// Options with kvpress's defaults.
    pub options: &'static [OptionDoc],
}

/// An option value: a string on the command line, any JSON scalar in a config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OptionValue {
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// Text (what the CLI passes).
    Str(String),
}

impl fmt::Display for OptionValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptionValue::Bool(b) => write!(f, "{b}"),
            OptionValue::Int(i) => write!(f, "{i}"),
            OptionValue::Float(x) => write!(f, "{x}"),
            OptionValue::Str(s) => f.write_str(s),
        }
    }
}

/// A press by name, with a budget and options: the one description of a press that the CLI, eval
/// configs and apps share. JSON: `{"name": "snapkv", "ratio": 0.5, "options": {"window_size": 32}}`
/// (exactly one of `ratio`, `tokens`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PressSpec {
    /// Registry name.
    pub name: String,
    /// Compression ratio in `[0, 1)`: fraction of the context's KV entries removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Kept context tokens per layer (and head), on average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    /// Options by kvpress name; missing ones take the defaults of [`PressDoc::options`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub options: BTreeMap<String, OptionValue>,
}

impl PressSpec {
    /// A press with a budget and default options.
    pub fn new(name: &str, budget: Budget) -> Self {
        let (ratio, tokens) = match budget {
            Budget::Ratio(r) => (Some(r), None),
            Budget::Tokens(n) => (None, Some(n)),
        };
        Self { name: name.to_string(), ratio, tokens, options: BTreeMap::new() }
    }

    /// The same with one more option.
    pub fn with_option(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.options.insert(key.to_string(), OptionValue::Str(value.to_string()));
        self
    }

    /// The same with one more option when `cond` holds.
    pub fn with_option_if(self, cond: bool, key: &str, value: impl fmt::Display) -> Self {
        if cond {
            self.with_option(key, value)
        } else {
            self
        }
    }

    /// The budget.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] unless exactly one of `ratio` and `tokens` is given;
    /// [`CoreError::Ratio`] outside `[0, 1)`; [`CoreError::Budget`] for 0 tokens.
    pub fn budget(&self) -> Result<Budget, CoreError> {
        match (self.ratio, self.tokens) {
            (Some(r), None) if !(0.0..1.0).contains(&r) => Err(CoreError::Ratio(r)),
            (Some(r), None) => Ok(Budget::Ratio(r)),
            (None, Some(0)) => Err(CoreError::Budget { budget: 0, context: 0 }),
            (None, Some(n)) => Ok(Budget::Tokens(n)),
            _ => Err(CoreError::PressOption {
                press: self.name.clone(),
                message: "give exactly one budget: a ratio in [0, 1) or a number of tokens".into(),
            }),
        }
    }

    /// A label for tables and file names: `name@ratio` or `name@Ntok`, plus options.
    pub fn label(&self) -> String {
        let mut s = match (self.ratio, self.tokens) {
            (Some(r), _) => format!("{}@{r}", self.name),
            (_, Some(n)) => format!("{}@{n}tok", self.name),
            _ => self.name.clone(),
        };
        for (k, v) in &self.options {
            s.push_str(&format!(",{k}={v}"));
        }
        s
    }

    /// Checks name, budget and options without building the press for a backend (e.g. before
    /// loading a model).
    ///
    /// # Errors
    /// As [`PressSpec::build`].
    pub fn check(&self) -> Result<(), CoreError> {
        self.parse().map(|_| ())
    }

    /// Builds the press.
    ///
    /// # Errors
    /// [`CoreError::UnknownPress`], [`CoreError::PressOption`] (unknown option, bad value, out of
    /// range), budget errors of [`PressSpec::budget`].
    pub fn build<B: Backend>(&self) -> Result<Box<dyn Press<B>>, CoreError> {
        Ok(match self.parse()? {
            Parsed::KvCompose(p) => Box::new(p),
            Parsed::Scored { name, scorer, budget, allocation } => Box::new(ScorerPress::<B>::new(name, Box::new(scorer), budget, allocation)),
        })
    }

    /// What the press reads of the prefill (see [`Press::needs`]).
    ///
    /// # Errors
    /// As [`PressSpec::build`].
    pub fn needs(&self) -> Result<CaptureSpec, CoreError> {
        Ok(match self.parse()? {
            Parsed::KvCompose(_) => CaptureSpec::default(),
            Parsed::Scored { scorer, .. } => scorer.needs(),
        })
    }

    /// The KVCompose press this spec names, its options and budget parsed; `None` for every other
    /// press. For callers that share KVCompose's scoring pass between budgets
    /// ([`KvCompose::score`] once, [`KvCompose::select_from`] per budget).
    ///
    /// # Errors
    /// As [`PressSpec::build`].
    pub fn kvcompose(&self) -> Result<Option<KvCompose>, CoreError> {
        Ok(match self.parse()? {
            Parsed::KvCompose(p) => Some(p),
            Parsed::Scored { .. } => None,
        })
    }

    fn parse(&self) -> Result<Parsed, CoreError> {
        let doc = find(&self.name)?;
        let budget = self.budget()?;
        let mut o = Options::new(&doc, &self.options);
        let parsed = match doc.name {
            "kvcompose" => Parsed::KvCompose(KvCompose::from_options(budget, &mut o)?),
            "pyramidkv" => {
                let window_size = o.usize("window_size")?;
                let scorer = AnyScorer::SnapKv(super::snapkv::SnapKv { window_size, kernel_size: o.odd("kernel_size")? });
                let beta = o.f64("beta")?;
                if beta < 1.0 {
                    return Err(o.error(format!("beta={beta}: must be >= 1")));
                }
                Parsed::Scored { name: PYRAMIDKV.name, scorer, budget, allocation: Allocation::Pyramid { window_size, beta } }
            }
            "adakv" => {
                let inner = o.string("scorer")?;
                let alpha_safeguard = o.f64("alpha_safeguard")?;
                if !(0.0..=1.0).contains(&alpha_safeguard) {
                    return Err(o.error(format!("alpha_safeguard={alpha_safeguard}: must be in [0, 1]")));
                }
                let inner_doc = scorer_doc(&inner).ok_or_else(|| {
                    o.error(format!("scorer={inner}: not a scorer press (known: {})", scorer_names().join(", ")))
                })?;
                let mut io = Options::new(inner_doc, &o.rest());
                io.owner = "adakv";
                let scorer = AnyScorer::parse(inner_doc.name, &mut io)?;
                io.finish()?;
                return Ok(Parsed::Scored { name: ADAKV.name, scorer, budget, allocation: Allocation::AdaKv { alpha_safeguard } });
            }
            name => Parsed::Scored { name: doc.name, scorer: AnyScorer::parse(name, &mut o)?, budget, allocation: Allocation::Uniform },
        };
        o.finish()?;
        Ok(parsed)
    }
}

enum Parsed {
    KvCompose(KvCompose),
    Scored { name: &'static str, scorer: AnyScorer, budget: Budget, allocation: Allocation },
}

/// A scorer press's registration: its documentation and how its options are read.
pub trait Registered: Sized {
    /// Name, options, defaults.
    const DOC: PressDoc;
    /// The scorer from options (defaults from [`Registered::DOC`]).
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for bad values.
    fn from_options(o: &mut Options<'_>) -> Result<Self, CoreError>;
}

/// The registered scorers: one line each (`Variant(type)`); every scorer is also a press of the
/// same name with a uniform budget, and a scorer of `adakv`.
macro_rules! scorers {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// Any registered scorer (backend-independent; a [`Scorer`] for every backend).
        #[derive(Clone, Debug, PartialEq)]
        pub enum AnyScorer {
            $(
                #[doc = concat!("`", stringify!($ty), "`")]
                $variant($ty),
            )*
        }

        const SCORER_DOCS: &[PressDoc] = &[$(<$ty as Registered>::DOC),*];

        impl AnyScorer {
            fn parse(name: &str, o: &mut Options<'_>) -> Result<Self, CoreError> {
                $(
                    if name == <$ty as Registered>::DOC.name {
                        return Ok(Self::$variant(<$ty as Registered>::from_options(o)?));
                    }
                )*
                Err(CoreError::UnknownPress { name: name.into(), known: names().join(", ") })
            }
        }

        impl PrefillNeeds for AnyScorer {
            fn needs(&self) -> CaptureSpec {
                match self { $(Self::$variant(s) => s.needs()),* }
            }
        }

        impl<B: Backend> Scorer<B> for AnyScorer {
            fn name(&self) -> &'static str {
                match self { $(Self::$variant(s) => Scorer::<B>::name(s)),* }
            }
            fn score(&self, input: &ScoreInput<'_, B>) -> Result<HeadScores, CoreError> {
                match self { $(Self::$variant(s) => Scorer::<B>::score(s, input)),* }
            }
        }
    };
}

scorers! {
    StreamingLlm(super::streaming_llm::StreamingLlm),
    Knorm(super::knorm::Knorm),
    Random(super::random::Random),
    SnapKv(super::snapkv::SnapKv),
    Tova(super::tova::Tova),
    ObservedAttention(super::observed_attention::ObservedAttention),
    ExpectedAttention(super::expected_attention::ExpectedAttention),
}

const PYRAMIDKV: PressDoc = PressDoc {
    name: "pyramidkv",
    about: "SnapKV scores; per-layer budgets shaped like a pyramid (more tokens in lower layers)",
    source: "kvpress presses/pyramidkv_press.py; Cai et al. 2024, arXiv 2406.02069",
    layout: Layout::PerLayer,
    cost: "as snapkv",
    refeeds: 0,
    options: &[
        OptionDoc { name: "window_size", default: "64", help: "observation window (last context queries), also the pyramid's base" },
        OptionDoc { name: "kernel_size", default: "5", help: "average-pooling kernel over positions (odd)" },
        OptionDoc { name: "beta", default: "20", help: "pyramid steepness (>= 1): top layer keeps 1/beta of the bottom's extra" },
    ],
};

const ADAKV: PressDoc = PressDoc {
    name: "adakv",
    about: "wrapper: any scorer's scores, head-adaptive budgets within each layer (the best scores over all heads)",
    source: "kvpress presses/adakv_press.py; Feng et al. 2024, arXiv 2407.11550",
    layout: Layout::PerHead,
    cost: "as its scorer; later attention calls add a per-head padding mask",
    refeeds: 0,
    options: &[
        OptionDoc { name: "scorer", default: "snapkv", help: "the scorer press whose scores are used; its options pass through" },
        OptionDoc { name: "alpha_safeguard", default: "0.2", help: "fraction of the uniform budget every head keeps at least, [0, 1]" },
    ],
};

/// Documentation of every registered press, in `kvc presses` order.
pub fn docs() -> Vec<PressDoc> {
    let mut all = vec![KvCompose::DOC];
    all.extend_from_slice(SCORER_DOCS);
    all.push(PYRAMIDKV);
    all.push(ADAKV);
    all
}

/// Names of every registered press.
pub fn names() -> Vec<&'static str> {
    docs().iter().map(|d| d.name).collect()
}

fn scorer_doc(name: &str) -> Option<&'static PressDoc> {
    SCORER_DOCS.iter().find(|d| d.name == name)
}

fn scorer_names() -> Vec<&'static str> {
    SCORER_DOCS.iter().map(|d| d.name).collect()
}

fn find(name: &str) -> Result<PressDoc, CoreError> {
    docs().into_iter().find(|d| d.name == name).ok_or_else(|| CoreError::UnknownPress { name: name.into(), known: names().join(", ") })
}

/// A press's options being read: values by name, defaults from the press's [`PressDoc`]; every
/// option given must be read ([`Options::finish`] names the unknown ones).
pub struct Options<'a> {
    doc: &'a PressDoc,
    given: BTreeMap<String, String>,
    owner: &'static str,
}

impl<'a> Options<'a> {
    fn new(doc: &'a PressDoc, given: &BTreeMap<String, OptionValue>) -> Self {
        Self { doc, given: given.iter().map(|(k, v)| (k.clone(), v.to_string())).collect(), owner: doc.name }
    }

    /// Options of `doc` as given (tests of a press's `from_options`).
    pub fn for_test(doc: &'a PressDoc, given: &BTreeMap<String, OptionValue>) -> Self {
        Self::new(doc, given)
    }

    /// An error about this press's options.
    pub fn error(&self, message: String) -> CoreError {
        let press = if self.owner == self.doc.name { self.doc.name.to_string() } else { format!("{} ({})", self.owner, self.doc.name) };
        CoreError::PressOption { press, message }
    }

    fn raw(&mut self, key: &str) -> Result<String, CoreError> {
        if let Some(v) = self.given.remove(key) {
            return Ok(v);
        }
        match self.doc.options.iter().find(|o| o.name == key) {
            Some(o) => Ok(o.default.to_string()),
            None => Err(self.error(format!("option {key} is not documented (a bug of this press)"))),
        }
    }

    /// A text option.
    ///
    /// # Errors
    /// Never for a documented option.
    pub fn string(&mut self, key: &str) -> Result<String, CoreError> {
        self.raw(key)
    }

    /// A non-negative integer option.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for anything else.
    pub fn usize(&mut self, key: &str) -> Result<usize, CoreError> {
        let v = self.raw(key)?;
        v.parse().map_err(|_| self.error(format!("{key}={v}: expected a non-negative integer")))
    }

    /// A positive integer option.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for 0 or anything else.
    pub fn positive(&mut self, key: &str) -> Result<usize, CoreError> {
        match self.usize(key)? {
            0 => Err(self.error(format!("{key}=0: must be at least 1"))),
            n => Ok(n),
        }
    }

    /// An odd positive integer option.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for an even number or anything else.
    pub fn odd(&mut self, key: &str) -> Result<usize, CoreError> {
        match self.usize(key)? {
            n if n % 2 == 1 => Ok(n),
            n => Err(self.error(format!("{key}={n}: must be odd"))),
        }
    }

    /// A finite number option.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for anything else.
    pub fn f64(&mut self, key: &str) -> Result<f64, CoreError> {
        let v = self.raw(key)?;
        v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| self.error(format!("{key}={v}: expected a number")))
    }

    /// A boolean option (`true`/`false`, `1`/`0`, `yes`/`no`).
    ///
    /// # Errors
    /// [`CoreError::PressOption`] for anything else.
    pub fn bool(&mut self, key: &str) -> Result<bool, CoreError> {
        let v = self.raw(key)?;
        match v.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(self.error(format!("{key}={v}: expected true or false"))),
        }
    }

    fn rest(&mut self) -> BTreeMap<String, OptionValue> {
        std::mem::take(&mut self.given).into_iter().map(|(k, v)| (k, OptionValue::Str(v))).collect()
    }

    /// Fails on options given but not read.
    ///
    /// # Errors
    /// [`CoreError::PressOption`] naming them and the known options.
    pub fn finish(self) -> Result<(), CoreError> {
        if let Some(k) = self.given.keys().next() {
            let known: Vec<&str> = self.doc.options.iter().map(|o| o.name).collect();
            let known = if known.is_empty() { "none".to_string() } else { known.join(", ") };
            return Err(self.error(format!("unknown option {k:?} (known: {known})")));
        }
        Ok(())
    }
}
