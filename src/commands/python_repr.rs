//! Python's `repr` of the few value kinds `debug` prints (floats, strings,
//! ints, None), so its lines match the original assignment's output to the
//! character: `{'partition': 2, 'key': 'December', 'date': '2000-12-26', 'degrees': 31.5235}`.

use std::fmt::Write;

/// `repr(float)`: the shortest string that round-trips, always with a
/// decimal point or an exponent, scientific notation outside [1e-4, 1e16).
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let magnitude = x.abs();
    if magnitude != 0.0 && !(1e-4..1e16).contains(&magnitude) {
        // Rust prints "1e16" / "1.5e-5"; Python prints "1e+16" / "1.5e-05".
        let text = format!("{x:e}");
        let (mantissa, exponent) = text.split_once('e').unwrap_or((&text, "0"));
        let (sign, digits) = match exponent.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exponent),
        };
        return format!("{mantissa}e{sign}{digits:0>2}");
    }
    let text = format!("{x}");
    if text.contains('.') {
        text
    } else {
        text + ".0"
    }
}

/// `repr(str)`: single quotes unless the text holds a single quote and no
/// double quote; backslash escapes for quotes, backslashes and controls.
pub fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `repr(bytes)` for a key that is not UTF-8: `b'...'` with `\xNN` escapes.
pub fn bytes_repr(bytes: &[u8]) -> String {
    let mut out = String::from("b'");
    for &b in bytes {
        match b {
            b'\\' => out.push_str("\\\\"),
            b'\'' => out.push_str("\\'"),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        assert_eq!(float_repr(31.5235), "31.5235");
        assert_eq!(float_repr(40.391), "40.391");
        assert_eq!(float_repr(35.0), "35.0");
        assert_eq!(float_repr(1000000.0), "1000000.0");
        assert_eq!(float_repr(-3.25), "-3.25");
        assert_eq!(float_repr(0.0), "0.0");
        assert_eq!(float_repr(0.0001), "0.0001");
        assert_eq!(float_repr(0.00001), "1e-05");
        assert_eq!(float_repr(1.5e-7), "1.5e-07");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(1.234e20), "1.234e+20");
        assert_eq!(float_repr(9999999999999998.0), "9999999999999998.0");
        assert_eq!(float_repr(f64::NAN), "nan");
        assert_eq!(float_repr(f64::NEG_INFINITY), "-inf");
        assert_eq!(float_repr(0.1 + 0.2), "0.30000000000000004");
    }

    #[test]
    fn strings_print_as_python_prints_them() {
        assert_eq!(str_repr("December"), "'December'");
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(str_repr("x\ny\\"), "'x\\ny\\\\'");
        assert_eq!(str_repr("\u{1}"), "'\\x01'");
        assert_eq!(bytes_repr(b"\xffJan'"), "b'\\xffJan\\''");
    }
}
