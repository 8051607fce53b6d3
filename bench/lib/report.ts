/**
 * How every benchmark prints: one table per benchmark, each figure beside the baseline measured
 * in the same run and their ratio, as the issue tables do. Figures only: nothing passes or fails.
 */
export interface Row {
  what: string;
  /** The project's figure, already formatted with its unit. */
  value: string;
  /** The same-run baseline, formatted; '' when the row has none. */
  baseline?: string;
  /** value / baseline (or whichever way the row says), '' when none. */
  ratio?: number | string;
}

export function printTable(title: string, rows: readonly Row[]): void {
  const cells = rows.map((r) => [
    r.what,
    r.value,
    r.baseline ?? '',
    typeof r.ratio === 'number' ? r.ratio.toFixed(2) : (r.ratio ?? ''),
  ]);
  const header = ['what', 'token-broker', 'same-run baseline', 'ratio'];
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  const line = (c: readonly string[]) => `| ${c.map((v, i) => v.padEnd(widths[i]!)).join(' | ')} |`;
  console.log(`\n## ${title}\n`);
  console.log(line(header));
  console.log(`|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`);
  for (const c of cells) console.log(line(c));
  console.log('');
}

/** The p-th percentile (0..100) of an ascending-sorted array; NaN when empty. */
export function percentileOf(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return Number.NaN;
  const index = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[index]!;
}

export const fmt = {
  rate: (perSecond: number) => `${perSecond.toFixed(0)}/s`,
  ms: (ms: number) => `${ms.toFixed(ms < 10 ? 2 : 1)} ms`,
  us: (us: number) => `${us.toFixed(0)} us`,
  mib: (bytes: number) => `${(bytes / 1024 / 1024).toFixed(0)} MiB`,
  kib: (bytes: number) => `${(bytes / 1024).toFixed(2)} KiB`,
};
