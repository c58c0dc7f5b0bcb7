//! librdkafka's batch consume (`rd_kafka_consume_batch_queue`) behind a
//! safe interface: the one FFI of wagate besides what rdkafka wraps.
#![allow(unsafe_code)]

use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

/// librdkafka's batch read of a consumer's queue
/// (`rd_kafka_consume_batch_queue`): one call hands back up to `capacity`
/// messages, where rdkafka's `poll` takes one event per message (a queue
/// wait, clock reads and an allocation each). Only for the bootstrap: with
/// it librdkafka serves statistics as callbacks, which rdkafka does not
/// set (it takes them as events), so `wagate_consumer_lag` from this
/// consumer pauses until the tail goes back to `poll`.
pub(crate) struct BatchRead<'c, C: ConsumerContext> {
    queue: *mut rdsys::rd_kafka_queue_t,
    slots: Vec<*mut rdsys::rd_kafka_message_t>,
    len: usize,
    _consumer: std::marker::PhantomData<&'c BaseConsumer<C>>,
}

impl<'c, C: ConsumerContext> BatchRead<'c, C> {
    pub(crate) fn new(consumer: &'c BaseConsumer<C>, capacity: usize) -> Option<Self> {
        // SAFETY: the client handle is valid for 'c; the queue reference
        // taken here is released in Drop, before the consumer can go.
        let queue = unsafe { rdsys::rd_kafka_queue_get_consumer(consumer.client().native_ptr()) };
        (!queue.is_null()).then(|| BatchRead {
            queue,
            slots: vec![std::ptr::null_mut(); capacity],
            len: 0,
            _consumer: std::marker::PhantomData,
        })
    }

    /// Releases the last batch and reads the next: how many messages came
    /// (0 after `timeout` with none).
    pub(crate) fn read(&mut self, timeout: Duration) -> usize {
        self.release();
        let ms = timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_int;
        // SAFETY: `slots` has room for `slots.len()` pointers; librdkafka
        // fills the first n (n ≤ that) and hands their ownership to us.
        let n = unsafe {
            rdsys::rd_kafka_consume_batch_queue(
                self.queue,
                ms,
                self.slots.as_mut_ptr(),
                self.slots.len(),
            )
        };
        self.len = usize::try_from(n).unwrap_or(0).min(self.slots.len());
        self.len
    }

    pub(crate) fn messages(&self) -> impl Iterator<Item = RawMessage<'_>> {
        self.slots[..self.len].iter().map(|&p| {
            // SAFETY: each of the first `len` slots is a message librdkafka
            // handed over, alive until `release`, which needs `&mut self`.
            let m = unsafe { &*p };
            RawMessage {
                topic: m.rkt,
                partition: m.partition,
                offset: m.offset,
                inner: m,
            }
        })
    }

    fn release(&mut self) {
        for &p in &self.slots[..self.len] {
            // SAFETY: owned by us since `read`, destroyed exactly once.
            unsafe { rdsys::rd_kafka_message_destroy(p) };
        }
        self.len = 0;
    }
}

impl<C: ConsumerContext> Drop for BatchRead<'_, C> {
    fn drop(&mut self) {
        self.release();
        // SAFETY: the reference taken in `new`, released once.
        unsafe { rdsys::rd_kafka_queue_destroy(self.queue) };
    }
}

/// A message of a [`BatchRead`], borrowed until the next read.
pub(crate) struct RawMessage<'b> {
    topic: *const rdsys::rd_kafka_topic_t,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    inner: &'b rdsys::rd_kafka_message_t,
}

impl<'b> RawMessage<'b> {
    pub(crate) fn error(&self) -> Option<rdkafka::error::RDKafkaErrorCode> {
        (self.inner.err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
            .then(|| self.inner.err.into())
    }

    /// Identifies the message's topic (the same for every message of one
    /// topic of this consumer): compare it instead of names.
    pub(crate) fn topic_handle(&self) -> usize {
        self.topic as usize
    }

    pub(crate) fn topic_name(&self) -> &'b [u8] {
        // SAFETY: a message's topic handle and its NUL-terminated name live
        // as long as the message.
        unsafe { std::ffi::CStr::from_ptr(rdsys::rd_kafka_topic_name(self.topic)) }.to_bytes()
    }

    pub(crate) fn key(&self) -> Option<&'b [u8]> {
        bytes(self.inner.key, self.inner.key_len)
    }

    pub(crate) fn value(&self) -> Option<&'b [u8]> {
        bytes(self.inner.payload, self.inner.len)
    }
}

/// The bytes at `ptr` (`None` for a null pointer: no key, a tombstone).
fn bytes<'b>(ptr: *mut std::ffi::c_void, len: usize) -> Option<&'b [u8]> {
    // SAFETY: librdkafka's key/payload pointers are either null or point
    // at `len` bytes owned by the message, which outlives 'b.
    (!ptr.is_null()).then(|| unsafe { std::slice::from_raw_parts(ptr as *const u8, len) })
}
