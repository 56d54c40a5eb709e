//! Kubernetes resource quantities such as `1Gi`, `500Mi` or `1.5e3`: one parser, serving both
//! the spec's validation and the comparison of a requested size with the one the API server
//! stored (which may write the same amount in another notation).

/// Why a text is not a quantity the operator can work with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantityError {
    /// Not the quantity grammar: a plain number, with an optional binary (`Ki` .. `Ei`), decimal
    /// (`n` .. `E`) or exponent (`e3`) suffix.
    Syntax,
    /// The grammar's, but too many digits or too large an exponent to compute the amount.
    OutOfRange,
}

/// A quantity's exact amount, normalised so that equal amounts compare equal however they are
/// written (`1Gi` and `1024Mi`, `1.5G` and `1500M`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount {
    /// Below zero (never for zero itself).
    pub negative: bool,
    /// The significant digits, trailing zeros moved into `exponent`.
    pub digits: u128,
    /// The power of ten `digits` is multiplied by.
    pub exponent: i32,
}

/// Parses a quantity into its exact [`Amount`]; the grammar is that of the CRD's schema pattern,
/// so API servers that skip schema validation are held to it too.
pub fn parse(text: &str) -> Result<Amount, QuantityError> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(QuantityError::Syntax);
    }
    let (binary_power, decimal_exponent) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        other => {
            let exponent = other.strip_prefix(['e', 'E']).ok_or(QuantityError::Syntax)?;
            let unsigned = exponent.strip_prefix(['+', '-']).unwrap_or(exponent);
            if unsigned.is_empty() || !unsigned.chars().all(|c| c.is_ascii_digit()) {
                return Err(QuantityError::Syntax);
            }
            (0, exponent.parse::<i32>().map_err(|_| QuantityError::OutOfRange)?)
        }
    };
    let mut digits: u128 = 0;
    for c in whole.chars().chain(fraction.chars()) {
        let digit = c.to_digit(10).ok_or(QuantityError::Syntax)?;
        digits = digits
            .checked_mul(10)
            .and_then(|d| d.checked_add(u128::from(digit)))
            .ok_or(QuantityError::OutOfRange)?;
    }
    digits = digits
        .checked_mul(1u128 << binary_power)
        .ok_or(QuantityError::OutOfRange)?;
    let mut exponent = i32::try_from(fraction.len())
        .ok()
        .and_then(|f| decimal_exponent.checked_sub(f))
        .ok_or(QuantityError::OutOfRange)?;
    if digits == 0 {
        return Ok(Amount {
            negative: false,
            digits: 0,
            exponent: 0,
        });
    }
    while digits.is_multiple_of(10) {
        digits /= 10;
        exponent = exponent.checked_add(1).ok_or(QuantityError::OutOfRange)?;
    }
    Ok(Amount {
        negative,
        digits,
        exponent,
    })
}

/// Whether `value` is written in the quantity grammar (whether or not its amount fits).
pub fn is_quantity(value: &str) -> bool {
    parse(value) != Err(QuantityError::Syntax)
}

/// Whether two quantities are the same amount. Two that do not parse are the same only when
/// written the same.
pub fn same_quantity(a: &str, b: &str) -> bool {
    a == b || parse(a).is_ok_and(|amount| parse(b) == Ok(amount))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_quantities_compare_equal_in_any_notation() {
        for (a, b) in [
            ("1Gi", "1024Mi"),
            ("1.5G", "1500M"),
            ("1e3", "1k"),
            ("0.5Ki", "512"),
            ("1E3", "1000"),
        ] {
            assert!(same_quantity(a, b), "{a} = {b}");
        }
        for (a, b) in [("1Gi", "1G"), ("1Ki", "1k"), ("2Gi", "1Gi"), ("1E", "1000")] {
            assert!(!same_quantity(a, b), "{a} != {b}");
        }
    }

    #[test]
    fn quantities_follow_the_api_server_grammar() {
        for ok in ["1Gi", "500Mi", "1.5G", "100", "1e3", "0.5Ti", "10k"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "Gi", "1GB", "1..5Gi", "lots", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn a_quantity_too_large_to_compute_is_still_a_quantity() {
        for huge in ["1e99999999999", "999999999999999999999999999999999999999999Ei"] {
            assert_eq!(parse(huge), Err(QuantityError::OutOfRange), "{huge}");
            assert!(is_quantity(huge), "{huge}");
            assert!(!same_quantity(huge, "1"), "{huge}");
            assert!(same_quantity(huge, huge), "{huge}");
        }
    }

    #[test]
    fn amounts_are_normalised() {
        assert_eq!(
            parse("-1.50k"),
            Ok(Amount {
                negative: true,
                digits: 15,
                exponent: 2
            })
        );
        assert_eq!(parse("-0"), parse("0"));
    }
}
