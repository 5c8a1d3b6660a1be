//! Typed, forgiving attribute access: `None` when absent or unparsable, so
//! callers decide what a missing attribute means and say so.
//!
//! Look attributes up with `get`, never `element`/`element_opt`, where they
//! may be absent: dicom-object builds its "no such element" error with a
//! forced backtrace capture (a stack walk, whatever RUST_BACKTRACE says).
//! Ingest looked up a few absent attributes per instance this way; profiles
//! showed the stack walks, though ingest wall time did not measurably move
//! when they went (BENCHMARKS.md).

use dicom_core::Tag;
use dicom_object::InMemDicomObject;

/// Read helpers on a data set.
pub trait Attrs {
    /// String value, trailing padding removed; `None` if absent or empty.
    fn str_of(&self, tag: Tag) -> Option<String>;
    fn u16_of(&self, tag: Tag) -> Option<u16>;
    fn i64_of(&self, tag: Tag) -> Option<i64>;
    fn f64_of(&self, tag: Tag) -> Option<f64>;
    fn f64s_of(&self, tag: Tag) -> Option<Vec<f64>>;
}

impl Attrs for InMemDicomObject {
    fn str_of(&self, tag: Tag) -> Option<String> {
        let e = self.get(tag)?;
        let s = e.to_str().ok()?;
        let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
        (!s.is_empty()).then(|| s.to_owned())
    }
    fn u16_of(&self, tag: Tag) -> Option<u16> {
        self.get(tag)?.to_int::<u16>().ok()
    }
    fn i64_of(&self, tag: Tag) -> Option<i64> {
        self.get(tag)?.to_int::<i64>().ok()
    }
    fn f64_of(&self, tag: Tag) -> Option<f64> {
        self.get(tag)?.to_float64().ok().filter(|v| v.is_finite())
    }
    fn f64s_of(&self, tag: Tag) -> Option<Vec<f64>> {
        let v = self.get(tag)?.to_multi_float64().ok()?;
        (!v.is_empty() && v.iter().all(|x| x.is_finite())).then_some(v)
    }
}
