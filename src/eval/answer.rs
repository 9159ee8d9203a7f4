//! Final-answer extraction from a generated solution (METHODS.md section 8,
//! `gen`): pure functions over strings.
//!
//! Order of precedence:
//! 1. the number after "####" (the GSM8K answer marker). With several
//!    markers the **first** one followed by a number wins: a model that
//!    keeps going after its answer is usually inventing a new problem;
//! 2. else the first number after the first "The answer is" (any case)
//!    that is followed by one;
//! 3. else the last number anywhere in the text.
//!
//! A number is an optional "-", an optional "$", digits with optional
//! thousands groups (",ddd", exactly three digits: "1,234" is 1234 but
//! "1,2" is 1 then 2) and an optional decimal part (".d+"; a "." not
//! followed by a digit, as a sentence's final stop, is not part of it).
//! Numbers are compared in a canonical form: commas and "$" removed,
//! leading zeros and a fraction's trailing zeros dropped ("5.50" → "5.5",
//! "5.0" → "5"), "-0" → "0". Exact match is string equality of those forms.

/// A number found in text: its canonical form and where it starts (at
/// its sign or "$" when it has them).
struct Found {
    canon: String,
    start: usize,
}

/// Canonical form of a number's parts: sign, integer digits (commas
/// removed), fraction digits.
fn canonical(neg: bool, int: &str, frac: &str) -> String {
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    let int = if int.is_empty() { "0" } else { int };
    let mut s = String::new();
    if neg && !(int == "0" && frac.is_empty()) {
        s.push('-');
    }
    s.push_str(int);
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    s
}

/// Every number in `text`, left to right.
fn numbers(text: &str) -> Vec<Found> {
    let b = text.as_bytes();
    let digit = |i: usize| i < b.len() && b[i].is_ascii_digit();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        // A sign may precede the digits directly or a "$" before them ("-$5", "$-5").
        let at = |j: usize, c: u8| i >= j && b[i - j] == c;
        let (neg, start) = if at(1, b'-') {
            (true, if at(2, b'$') { i - 2 } else { i - 1 })
        } else if at(1, b'$') {
            (at(2, b'-'), if at(2, b'-') { i - 2 } else { i - 1 })
        } else {
            (false, i)
        };
        let mut int = String::new();
        while digit(i) {
            int.push(b[i] as char);
            i += 1;
            // Thousands group: "," then exactly three digits.
            if i < b.len()
                && b[i] == b','
                && digit(i + 1)
                && digit(i + 2)
                && digit(i + 3)
                && !digit(i + 4)
            {
                int.push_str(&text[i + 1..i + 4]);
                i += 4;
                while i < b.len()
                    && b[i] == b','
                    && digit(i + 1)
                    && digit(i + 2)
                    && digit(i + 3)
                    && !digit(i + 4)
                {
                    int.push_str(&text[i + 1..i + 4]);
                    i += 4;
                }
                break;
            }
        }
        let mut frac = "";
        if i < b.len() && b[i] == b'.' && digit(i + 1) {
            let start = i + 1;
            i += 1;
            while digit(i) {
                i += 1;
            }
            frac = &text[start..i];
        }
        out.push(Found {
            canon: canonical(neg, &int, frac),
            start,
        });
    }
    out
}

/// The number that opens `text` after white space, ":", "=" or "*" (as
/// after an answer marker), if any.
fn number_right_after(text: &str) -> Option<String> {
    let t = text.trim_start_matches([' ', '\t', '\n', ':', '=', '*']);
    numbers(t)
        .into_iter()
        .next()
        .filter(|f| f.start == 0)
        .map(|f| f.canon)
}

/// The answer a generated solution commits to, in canonical form (see the
/// module doc for the precedence), or `None` if it holds no number.
pub fn extract_answer(text: &str) -> Option<String> {
    for (at, _) in text.match_indices("####") {
        if let Some(n) = number_right_after(&text[at + 4..]) {
            return Some(n);
        }
    }
    let lower = text.to_lowercase();
    if lower.len() == text.len() {
        for (at, _) in lower.match_indices("the answer is") {
            if let Some(n) = numbers(&text[at + 13..]).into_iter().next() {
                return Some(n.canon);
            }
        }
    }
    numbers(text).pop().map(|f| f.canon)
}

/// The canonical gold number of a reference answer: the text after the
/// last "####" when present (GSM8K solutions), else the whole string; it
/// must hold exactly one number.
pub fn gold_answer(answer: &str) -> Option<String> {
    let tail = match answer.rfind("####") {
        Some(at) => &answer[at + 4..],
        None => answer,
    };
    let mut found = numbers(tail);
    if found.len() == 1 {
        found.pop().map(|f| f.canon)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn x(s: &str) -> Option<String> {
        extract_answer(s)
    }

    #[test]
    fn marker_wins_and_is_cleaned() {
        assert_eq!(x("5 + 7 = 12 apples.\n#### 12").as_deref(), Some("12"));
        assert_eq!(
            x("so she pays $1,234.\n#### $1,234.").as_deref(),
            Some("1234")
        );
        assert_eq!(x("#### 1,234,567").as_deref(), Some("1234567"));
        assert_eq!(x("####-5").as_deref(), Some("-5"));
        assert_eq!(x("#### -$5.50").as_deref(), Some("-5.5"));
        assert_eq!(x("#### $-3").as_deref(), Some("-3"));
        // The marker beats a later "The answer is" and a later last number.
        assert_eq!(x("#### 8\nThe answer is 9. Then 10").as_deref(), Some("8"));
    }

    #[test]
    fn several_markers_first_wins() {
        assert_eq!(
            x("#### 42\nQuestion: next one\n#### 7").as_deref(),
            Some("42")
        );
        // A marker without a number is skipped.
        assert_eq!(x("#### \n so #### 3").as_deref(), Some("3"));
    }

    #[test]
    fn answer_is_phrase() {
        assert_eq!(
            x("First 3 then 4. The answer is 18.").as_deref(),
            Some("18")
        );
        assert_eq!(x("the answer is: $2,000. Later 5").as_deref(), Some("2000"));
        assert_eq!(x("The answer is -7").as_deref(), Some("-7"));
        assert_eq!(
            x("The answer is 0.25 dollars, not 3").as_deref(),
            Some("0.25")
        );
    }

    #[test]
    fn last_number_fallback() {
        assert_eq!(
            x("She had 5 and gave 2, so 3 remain.").as_deref(),
            Some("3")
        );
        assert_eq!(x("Total: 1,000 + 250 = 1,250.").as_deref(), Some("1250"));
        assert_eq!(x("It is 3.0").as_deref(), Some("3"));
        assert_eq!(x("costs 12.50.").as_deref(), Some("12.5"));
        assert_eq!(x("a list 1,2").as_deref(), Some("2"));
        assert_eq!(x("down to -0").as_deref(), Some("0"));
        assert_eq!(x("007").as_deref(), Some("7"));
        assert_eq!(x("nothing numeric here."), None);
        assert_eq!(x(""), None);
        assert_eq!(x("#### none"), None);
    }

    #[test]
    fn gold() {
        assert_eq!(gold_answer("3 + 4 = 7\n#### 7").as_deref(), Some("7"));
        assert_eq!(gold_answer("#### 1,200").as_deref(), Some("1200"));
        assert_eq!(gold_answer("-12").as_deref(), Some("-12"));
        assert_eq!(gold_answer("2.50").as_deref(), Some("2.5"));
        assert_eq!(gold_answer("3 or 4"), None);
        assert_eq!(gold_answer("none"), None);
    }
}
