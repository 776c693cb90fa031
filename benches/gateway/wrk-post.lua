-- wrk script of bench.py: POSTs $BODY with $AUTH, and prints one JSON line of exact figures.
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = os.getenv("AUTH")
wrk.body = os.getenv("BODY")

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"socket_errors":%d,"non_2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status))
end
