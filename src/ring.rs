//! A fixed-capacity FIFO that never allocates (arrayvec has no deque).

/// A ring of at most `N` items.
pub(crate) struct Ring<T, const N: usize> {
    items: [Option<T>; N],
    head: usize,
    len: usize,
}

impl<T, const N: usize> Ring<T, N> {
    pub(crate) fn new() -> Self {
        Ring {
            items: core::array::from_fn(|_| None),
            head: 0,
            len: 0,
        }
    }

    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends; gives the item back when full.
    #[inline]
    pub(crate) fn push_back(&mut self, v: T) -> Result<(), T> {
        if self.len == N {
            return Err(v);
        }
        let i = (self.head + self.len) % N;
        self.items[i] = Some(v);
        self.len += 1;
        Ok(())
    }

    #[inline]
    pub(crate) fn pop_front(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        let v = self.items[self.head].take();
        self.head = (self.head + 1) % N;
        self.len -= 1;
        v
    }

    #[inline]
    pub(crate) fn pop_back(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        self.items[(self.head + self.len) % N].take()
    }

    /// Drops every item.
    pub(crate) fn clear(&mut self) {
        while self.pop_front().is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;
    use std::collections::VecDeque;

    #[test]
    fn matches_vecdeque() {
        let mut r: Ring<u32, 5> = Ring::new();
        let mut d = VecDeque::new();
        let mut x = 7u32;
        for i in 0..10_000u32 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x % 3 {
                0 => assert_eq!(
                    r.push_back(i).is_ok(),
                    d.len() < 5 && {
                        d.push_back(i);
                        true
                    }
                ),
                1 => assert_eq!(
                    r.push_front(i).is_ok(),
                    d.len() < 5 && {
                        d.push_front(i);
                        true
                    }
                ),
                2 => assert_eq!(r.pop_front(), d.pop_front()),
                _ => assert_eq!(r.pop_back(), d.pop_back()),
            }
            assert_eq!(r.len(), d.len());
        }
    }
}
